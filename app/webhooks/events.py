"""Which job events a webhook can announce, and under which type."""

from __future__ import annotations

from typing import Any, Literal, get_args

# A status event announces the status the job took ("job." + its status); a checkpoint
# event, a checkpoint saved. Other events (metrics, warnings, ...) are never sent.
WebhookEventType = Literal[
    "job.queued",
    "job.running",
    "job.pausing",
    "job.paused",
    "job.preempted",
    "job.cancelling",
    "job.cancelled",
    "job.succeeded",
    "job.failed",
    "job.checkpoint",
]
EVENT_TYPES: tuple[str, ...] = get_args(WebhookEventType)


def webhook_type(kind: str, data: dict[str, Any]) -> str | None:
    """The webhook event type of a job event of type `kind`, None when none announces it."""
    if kind == "checkpoint":
        return "job.checkpoint"
    if kind == "status":
        name = f"job.{data.get('status')}"
        return name if name in EVENT_TYPES else None
    return None
