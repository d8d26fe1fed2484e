"""Batches what the engine reports into a few database writes per second.

Steps can take a millisecond; one write per step would make the database the
bottleneck. Metrics and events wait in memory and go out together at most every
`flush_seconds` (and at every checkpoint and at the end), in one transaction that
also renews the heartbeat and reads the cancel flag.
"""

from __future__ import annotations

import math
import time
from typing import Any

from app.checkpoints import service as checkpoints_service
from app.checkpoints.store import CheckpointStore
from app.db import Database
from app.jobs.runs import Claim, record_progress
from worker.engine.checkpoint import Checkpoint
from worker.engine.trainer import StepMetrics
from worker.live import LivePublisher


def finite_or_none(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf or NaN (an fp16 overflow step has both): store them as null."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in values.items()
    }


class ProgressWriter:
    def __init__(
        self,
        database: Database,
        claim: Claim,
        store: CheckpointStore,
        publisher: LivePublisher,
        flush_seconds: float,
    ) -> None:
        self.database = database
        self.claim = claim
        self.store = store
        self.publisher = publisher
        self.flush_seconds = flush_seconds
        self.pending_metrics: list[dict[str, Any]] = []
        self.pending_events: list[tuple[str, dict[str, Any]]] = []
        self.job_values: dict[str, Any] = {}
        self.last_flush = time.monotonic()
        self.cancel_requested = False

    # ---- engine callbacks

    def on_start(self, done_steps: int, total_steps: int) -> None:
        self.job_values["max_steps"] = total_steps
        self.flush()

    def on_step(self, metrics: StepMetrics) -> None:
        values = finite_or_none(metrics.to_dict())
        self.pending_metrics.append(values)
        self.job_values.update(
            step=metrics.step,
            epoch=metrics.epoch,
            samples_seen=metrics.samples_seen,
            tokens_seen=metrics.tokens_seen,
            micro_batch_size=metrics.micro_batch_size,
            accumulation_steps=metrics.accumulation_steps,
            metrics=values,
        )
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind != "checkpoint":  # save_checkpoint records that one with the bytes
            self.pending_events.append((kind, finite_or_none(data)))

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.flush()
        with self.database.session() as session:
            checkpoints_service.save_checkpoint(
                session,
                claim=self.claim,
                store=self.store,
                step=checkpoint.step,
                weights=checkpoint.weights,
                state=checkpoint.state,
                loss=checkpoint.loss,
            )
            session.commit()
        self.publisher.publish(
            self.claim.job_id, [{"type": "checkpoint", "data": {"step": checkpoint.step}}]
        )

    def should_stop(self) -> str | None:
        if not self.cancel_requested and time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()
        return "cancelled" if self.cancel_requested else None

    # ---- writing

    def flush(self) -> None:
        metrics, events = self.pending_metrics, self.pending_events
        self.pending_metrics, self.pending_events = [], []
        with self.database.session() as session:
            self.cancel_requested = record_progress(
                session,
                claim=self.claim,
                job_values=self.job_values,
                metrics=metrics,
                events=events,
            )
            session.commit()
        self.last_flush = time.monotonic()
        live = [{"type": "metrics", "data": metric} for metric in metrics]
        live += [{"type": kind, "data": data} for kind, data in events]
        self.publisher.publish(self.claim.job_id, live)
