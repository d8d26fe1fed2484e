"""Batches what the engine reports into a few database writes per second.

Steps can take a millisecond; one write per step would make the database the
bottleneck. Metrics and events wait in memory and go out together at most every
`flush_seconds` (and at every checkpoint and at the end), in one transaction that
also renews the lease and reads the cancel and release flags.

A database blip does not stop training: what could not be written stays pending and
goes out with the next flush. Checkpoints and the final flush must be written, and
are retried until `give_up_seconds` (the lease timeout: after that the job may be
someone else's, and the fenced writes would say so).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from app.blobs import BlobStore
from app.checkpoints import service as checkpoints_service
from app.db import Database
from app.jobs.runs import Claim, record_progress
from worker.engine.checkpoint import LiveCheckpoint
from worker.engine.trainer import StepMetrics
from worker.lease import LeaseKeeper
from worker.live import LivePublisher

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_PAUSE_SECONDS = 1.0


# SQLSTATE classes a retry can get past: connection exception (08), transaction
# rollback (40: serialization failure, deadlock), insufficient resources (53: too many
# connections), operator intervention (57: the server shuts down, a statement timeout).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")
# SQLite: another connection holds the lock, or the file could not be read for now.
_TRANSIENT_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN")


def is_transient(error: DBAPIError) -> bool:
    """Whether the same statement can succeed later: the connection was lost or could not
    be made, or the database was busy. A broken constraint, bad data or a bad statement
    (IntegrityError, DataError, ProgrammingError) fails the same way every time."""
    if error.connection_invalidated:
        return True
    if not isinstance(error, OperationalError | InterfaceError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)  # psycopg, from the server
    if sqlstate:
        return str(sqlstate).startswith(_TRANSIENT_SQLSTATE_CLASSES)
    sqlite_error = getattr(error.orig, "sqlite_errorname", None)
    if sqlite_error:
        return str(sqlite_error).startswith(_TRANSIENT_SQLITE_ERRORS)
    return True  # no answer from a server: the connection failed on our side


def retry_database(operation: Callable[[], T], give_up_seconds: float, what: str) -> T:
    """Run `operation`, retrying connection errors for up to `give_up_seconds`; any other
    database error is raised at once."""
    deadline = time.monotonic() + give_up_seconds
    while True:
        try:
            return operation()
        except DBAPIError as error:
            if not is_transient(error) or time.monotonic() >= deadline:
                raise
            logger.warning("%s failed (%s); retrying", what, type(error.orig).__name__)
            time.sleep(RETRY_PAUSE_SECONDS)


def finite_or_none(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf or NaN (an fp16 overflow step has both): store them as null."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in values.items()
    }


@dataclass(eq=False)
class ProgressWriter:
    database: Database
    claim: Claim
    store: BlobStore
    publisher: LivePublisher
    keeper: LeaseKeeper
    _: KW_ONLY
    flush_seconds: float
    give_up_seconds: float
    pending_metrics: list[dict[str, Any]] = field(init=False, default_factory=list)
    pending_events: list[tuple[str, dict[str, Any]]] = field(init=False, default_factory=list)
    job_values: dict[str, Any] = field(init=False, default_factory=dict)
    last_flush: float = field(init=False, default_factory=time.monotonic)
    failing_since: float | None = field(init=False, default=None)

    def on_start(self, done_steps: int, total_steps: int) -> None:
        self.job_values["max_steps"] = total_steps
        self.flush(required=True)

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
            self.flush(required=False)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind != "checkpoint":  # save_checkpoint records that one with the bytes
            self.pending_events.append((kind, finite_or_none(data)))

    def on_checkpoint(self, checkpoint: LiveCheckpoint) -> None:
        self.flush(required=True)

        def save() -> None:
            with self.database.session() as session:
                checkpoints_service.save_checkpoint(
                    session,
                    claim=self.claim,
                    store=self.store,
                    step=checkpoint.step,
                    # Serialised straight into the store, a chunk at a time.
                    weights=checkpoint.write_weights,
                    state=checkpoint.write_state,
                    merged=checkpoint.write_merged if checkpoint.has_merged else None,
                    loss=checkpoint.loss,
                    eval_loss=checkpoint.eval_loss,
                )
                session.commit()

        retry_database(save, self.give_up_seconds, f"checkpoint of {self.claim.job_id}")
        self.publisher.publish(
            self.claim.job_id, [{"type": "checkpoint", "data": {"step": checkpoint.step}}]
        )

    def should_stop(self) -> str | None:
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush(required=False)
        return self.keeper.stop_reason()

    def flush(self, *, required: bool = True) -> None:
        """Write what is pending. Not `required`: on a connection error keep it for the
        next flush (up to `give_up_seconds` of failures); `required`: retry until then."""
        if required:
            retry_database(self._write, self.give_up_seconds, f"progress of {self.claim.job_id}")
            return
        try:
            self._write()
        except DBAPIError as error:
            now = time.monotonic()
            self.failing_since = self.failing_since or now
            if not is_transient(error) or now - self.failing_since >= self.give_up_seconds:
                raise
            logger.warning("job %s: progress write failed; kept for later", self.claim.job_id)
            self.last_flush = now

    def _write(self) -> None:
        metrics, events = self.pending_metrics, self.pending_events
        with self.database.session() as session:
            heartbeat = record_progress(
                session,
                claim=self.claim,
                job_values=self.job_values,
                metrics=metrics,
                events=events,
            )
            session.commit()
        # Only once committed: a failed write keeps everything for the next try.
        self.pending_metrics, self.pending_events = [], []
        self.failing_since = None
        self.keeper.observe(heartbeat)
        self.last_flush = time.monotonic()
        live = [{"type": "metrics", "data": metric} for metric in metrics]
        live += [{"type": kind, "data": data} for kind, data in events]
        self.publisher.publish(self.claim.job_id, live)
