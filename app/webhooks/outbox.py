"""The outbox: a delivery row per endpoint that wants a job event, written in the event's
transaction, so that a committed state change is announced at least once (and a rolled
back one never)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, literal, select
from sqlalchemy.orm import Session

from app.jobs.models import Job
from app.webhooks.events import webhook_type
from app.webhooks.models import WebhookDelivery, WebhookSubscription

DELIVERY_COLUMNS = (
    "webhook_id",
    "endpoint_id",
    "job_id",
    "type",
    "job_status",
    "data",
    "created_at",
    "status",
    "attempts",
    "next_attempt_at",
)


def new_webhook_id_prefix() -> str:
    # One per event; each endpoint's row appends its endpoint id, so that ids are unique.
    return f"msg_{secrets.token_hex(12)}_"


def enqueue_deliveries(
    session: Session, *, job_id: str, events: Sequence[tuple[str, dict[str, Any]]], now: datetime
) -> None:
    """Insert the deliveries of `events` (the caller's job events, in order). An event
    no webhook announces (metrics, warnings) costs nothing; one that may costs one
    INSERT … SELECT, an index lookup that inserts nothing when no endpoint of the job's
    tenant wants it."""
    for kind, data in events:
        event_type = webhook_type(kind, data)
        if event_type is None:
            continue
        subscribed = (
            select(
                literal(new_webhook_id_prefix()) + WebhookSubscription.endpoint_id,
                WebhookSubscription.endpoint_id,
                Job.id,
                literal(event_type),
                Job.status,
                literal(data, WebhookDelivery.data.type),
                literal(now, WebhookDelivery.created_at.type),
                literal("pending"),
                literal(0),
                literal(now, WebhookDelivery.next_attempt_at.type),
            )
            .join(Job, Job.tenant == WebhookSubscription.tenant)
            .where(Job.id == job_id, WebhookSubscription.event_type == event_type)
            .order_by(WebhookSubscription.endpoint_id)
        )
        session.execute(insert(WebhookDelivery).from_select(DELIVERY_COLUMNS, subscribed))
