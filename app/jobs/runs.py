"""The writes a worker makes for the job it runs: claim, progress, outcome.

Every write after the claim is conditional on the lease the claim returned, so a
worker that lost the job (a duplicate delivery, a stale run) can never overwrite
the work of the job's current owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.models import Job, JobEvent, JobMetric

METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_sec", "micro_batch_size")


class LeaseLost(Exception):
    """The job is no longer this worker's: stop without writing anything more."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    lease: int
    attempt: int


def claim_job(session: Session, *, job_id: str, worker: str) -> Claim | None:
    """Take a queued job; None when it is not queued (a duplicate delivery, a cancel)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease=Job.lease + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=now,
        )
        .returning(Job.lease, Job.attempts)
    ).first()
    if row is None:
        return None
    append_events(session, job_id, [("status", {"status": "running", "worker": worker})])
    return Claim(job_id=job_id, lease=row.lease, attempt=row.attempts)


def _owned(claim: Claim) -> Any:
    return (Job.id == claim.job_id) & (Job.lease == claim.lease)


def record_progress(
    session: Session,
    *,
    claim: Claim,
    job_values: dict[str, Any],
    metrics: Sequence[dict[str, Any]],
    events: Sequence[tuple[str, dict[str, Any]]],
) -> bool:
    """Write a batch of steps and events; returns whether a cancel was requested."""
    row = session.execute(
        update(Job)
        .where(_owned(claim), Job.status.in_(("running", "cancelling")))
        .values(heartbeat_at=utcnow(), **job_values)
        .returning(Job.cancel_requested)
    ).first()
    if row is None:
        raise LeaseLost(claim.job_id)
    if metrics:
        session.execute(insert(JobMetric), [metric_row(claim.job_id, m) for m in metrics])
    append_events(session, claim.job_id, events)
    return bool(row.cancel_requested)


def finish_job(
    session: Session,
    *,
    claim: Claim,
    status: str,
    error: tuple[str, str] | None = None,
    event_data: dict[str, Any] | None = None,
) -> None:
    """Record the outcome: succeeded, failed or cancelled."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "heartbeat_at": utcnow()}
    if error is not None:
        values |= {"error_type": error[0], "error_message": error[1]}
    changed = session.execute(
        update(Job).where(_owned(claim), Job.status.in_(("running", "cancelling"))).values(**values)
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        raise LeaseLost(claim.job_id)
    data = {"status": status, **(event_data or {})}
    if error is not None:
        data |= {"error": {"type": error[0], "message": error[1]}}
        append_events(session, claim.job_id, [("error", {"type": error[0], "message": error[1]})])
    append_events(session, claim.job_id, [("status", data)])


def metric_row(job_id: str, metric: dict[str, Any]) -> dict[str, Any]:
    extra = {key: value for key, value in metric.items() if key not in (*METRIC_COLUMNS, "time")}
    return {
        "job_id": job_id,
        **{key: metric[key] for key in METRIC_COLUMNS},
        "time": datetime.fromtimestamp(metric["time"], UTC),
        "extra": extra,
    }


def append_events(
    session: Session, job_id: str, events: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    now = utcnow()
    for kind, data in events:
        session.add(JobEvent(job_id=job_id, type=kind, data=data, created_at=now))
    session.flush()
