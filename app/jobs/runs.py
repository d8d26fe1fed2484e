"""The writes a worker makes for the job it runs: claim, heartbeat, progress, outcome.

The database, not the broker, decides who trains a job. A claim is one conditional
update that bumps the job's `lease` (its fencing epoch) and returns it; every later
write carries that lease and the statuses a live run can be in, so a worker that lost
the job (a duplicate delivery, a run the reaper gave up on) can never overwrite the
work of the job's current owner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session

from app.checkpoints.models import Checkpoint
from app.db import utcnow
from app.files.models import DataFile, JobFile
from app.jobs.models import Job, JobAttempt, JobEvent, JobMetric, JobSlot
from app.queue import Sender
from app.webhooks import outbox

METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_sec", "micro_batch_size")
# A pausing job runs until its next optimizer step, then checkpoints and is paused.
LIVE_STATUSES = ("running", "cancelling", "pausing")
# Counted against a tenant's cap; a job in one of these may still read its files.
ACTIVE_STATUSES = ("queued", *LIVE_STATUSES)


class LeaseLost(Exception):
    """The job is no longer this worker's: stop without writing anything more."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    lease: int
    attempt: int
    resumed_from_step: int
    runtime_seconds: float


@dataclass(frozen=True)
class Heartbeat:
    """What the owner of a running job learns each time it renews its lease."""

    cancel_requested: bool
    release_requested: bool


def sendable() -> ColumnElement[bool]:
    """Whether a job may go to a worker now: the one answer for submit, a file's
    validation, the reaper and the claim. Queued (so neither cancelled nor out of
    attempts: a cancel of a queued job ends it at once, and a run that used the last
    attempt fails it) and training on no file that is still validating (that
    validation sends the job)."""
    file_validating = exists(
        select(JobFile.file_id)
        .join(DataFile, DataFile.id == JobFile.file_id)
        .where(JobFile.job_id == Job.id, DataFile.status == "validating")
        # Only the job: a query that also joins job_files must not narrow this to its row.
        .correlate(Job)
    )
    return and_(Job.status == "queued", ~file_validating)


def mark_sent(session: Session, *, job_ids: Sequence[str]) -> list[str]:
    """Of `job_ids`, the sendable ones, stamped sent now: the caller sends each after the
    commit (and calls `mark_unsent` for one it could not send)."""
    if not job_ids:
        return []
    return list(
        session.scalars(
            update(Job)
            .where(Job.id.in_(job_ids), sendable())
            .values(enqueued_at=utcnow())
            .returning(Job.id)
        )
    )


def mark_unsent(session: Session, *, job_id: str) -> None:
    """The job's message could not be published: the reaper sends it on its next pass."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=None)
    )


def send_jobs(
    session: Session,
    job_ids: Sequence[str],
    *,
    send: Sender,
    devices: Mapping[str, int] | None = None,
) -> None:
    """Send jobs marked sent, after the commit that marked them; one the broker does not
    take is marked unsent again (committed), for the reaper's next pass. `devices` (each
    job's, which picks its queue) is read from the jobs unless the caller knows it."""
    if devices is None and job_ids:
        query = select(Job.id, Job.devices).where(Job.id.in_(job_ids))
        devices = {job_id: count for job_id, count in session.execute(query).tuples()}
    unsent = [job_id for job_id in job_ids if not send(job_id, (devices or {}).get(job_id, 1))]
    for job_id in unsent:
        mark_unsent(session, job_id=job_id)
    if unsent:
        session.commit()


def claimable(now: datetime, lease_timeout: float) -> ColumnElement[bool]:
    """Sendable, or running with a heartbeat older than the lease: its worker is gone."""
    stale = Job.heartbeat_at < now - timedelta(seconds=lease_timeout)
    return and_(
        Job.attempts < Job.max_attempts,
        or_(sendable(), and_(Job.status == "running", stale)),
    )


def claim_job(session: Session, *, job_id: str, worker: str, lease_timeout: float) -> Claim | None:
    """Take the job for `worker`; None when it is not claimable (a duplicate delivery, a
    cancel, a live run elsewhere, attempts used up): the caller then writes nothing."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable(now, lease_timeout))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease=Job.lease + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
            last_started_at=now,
            release_requested=False,
            release_reason=None,
            held_by=None,
        )
        .returning(Job.lease, Job.attempts, Job.runtime_seconds, Job.queued_at)
    ).first()
    if row is None:
        return None
    end_open_attempts(session, job_id, reason="worker_lost", now=now)
    # The run resumes from the newest checkpoint: what an earlier run recorded past it
    # (metrics flushed between that checkpoint and its death) is trained again.
    resumed = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))
    resumed_from_step = resumed or 0
    session.execute(
        delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > resumed_from_step)
    )
    session.execute(update(Job).where(Job.id == job_id).values(step=resumed_from_step))
    session.add(
        JobAttempt(
            job_id=job_id,
            attempt=row.lease,
            worker=worker,
            started_at=now,
            resumed_from_step=resumed_from_step,
            counted=True,
            waited_seconds=_seconds_between(row.queued_at, now),
        )
    )
    data = {"status": "running", "worker": worker, "attempt": row.attempts}
    append_events(session, job_id, [("status", data | {"resumed_from_step": resumed_from_step})])
    return Claim(job_id, row.lease, row.attempts, resumed_from_step, row.runtime_seconds)


def _seconds_between(start: datetime | None, end: datetime) -> float | None:
    if start is None:
        return None
    if start.tzinfo is None:  # SQLite hands back naive UTC times
        start = start.replace(tzinfo=UTC)
    return max(0.0, (end - start).total_seconds())


def owned(claim: Claim) -> ColumnElement[bool]:
    """The claimed job, while the claim is its current one and the run is live."""
    return and_(Job.id == claim.job_id, Job.lease == claim.lease, Job.status.in_(LIVE_STATUSES))


def renew_lease(session: Session, *, claim: Claim, **values: Any) -> Heartbeat:
    """Renew the lease, write `values` to the job (the training time, the progress), and
    read the flags a worker obeys."""
    row = session.execute(
        update(Job)
        .where(owned(claim))
        .values(heartbeat_at=utcnow(), **values)
        .returning(Job.cancel_requested, Job.release_requested)
    ).first()
    if row is None:
        raise LeaseLost(claim.job_id)
    return Heartbeat(bool(row.cancel_requested), bool(row.release_requested))


def record_progress(
    session: Session,
    *,
    claim: Claim,
    job_values: dict[str, Any],
    metrics: Sequence[dict[str, Any]],
    events: Sequence[tuple[str, dict[str, Any]]],
) -> Heartbeat:
    """Write a batch of steps and events; renews the lease like a heartbeat."""
    heartbeat = renew_lease(session, claim=claim, **job_values)
    if metrics:
        session.execute(insert(JobMetric), [metric_row(claim.job_id, m) for m in metrics])
    # Each step is also a `metrics` event, so that one cursor (the event id) orders
    # everything a stream sends.
    append_events(session, claim.job_id, [("metrics", metric_event_data(m)) for m in metrics])
    append_events(session, claim.job_id, events)
    return heartbeat


def finish_job(
    session: Session,
    *,
    claim: Claim,
    status: str,
    error: tuple[str, str] | None = None,
    event_data: dict[str, Any] | None = None,
    runtime_seconds: float | None = None,
) -> None:
    """Record the outcome: succeeded, failed or cancelled. Final: no retry follows."""
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "heartbeat_at": now}
    if runtime_seconds is not None:
        values["runtime_seconds"] = runtime_seconds
    if error is not None:
        values |= {"error_type": error[0], "error_message": error[1]}
    changed = session.execute(update(Job).where(owned(claim)).values(**values)).rowcount  # type: ignore[attr-defined]
    if not changed:
        raise LeaseLost(claim.job_id)
    end_attempt(session, claim, reason=error[0] if error else status, now=now)
    data = {"status": status, **(event_data or {})}
    if error is not None:
        data |= {"error": {"type": error[0], "message": error[1]}}
        append_events(session, claim.job_id, [("error", {"type": error[0], "message": error[1]})])
    append_events(session, claim.job_id, [("status", data)])


def hand_back(
    session: Session,
    *,
    claim: Claim,
    reason: str,
    counted: bool,
    runtime_seconds: float | None = None,
) -> bool:
    """Put the job back in the queue for another run, or pause it.

    `shutdown` (the run stopped because it was asked to: its worker stops, a job of higher
    priority takes its device, a pause) is not counted against max_attempts; an
    infrastructure failure is, and fails the job `reason` once attempts are used up. A
    run asked to stop learns why from the job's row: a `pausing` job is `paused` (its
    checkpoint kept, no device held), a preempted one goes back to the queue with a
    `preempted` status event. Returns whether the job was re-queued (the caller then
    sends its message).
    """
    now = utcnow()
    job = session.execute(
        select(
            Job.attempts,
            Job.max_attempts,
            Job.cancel_requested,
            Job.status,
            Job.release_requested,
            Job.release_reason,
        ).where(owned(claim))
    ).first()
    if job is None:
        raise LeaseLost(claim.job_id)
    attempts = job.attempts if counted else job.attempts - 1
    if job.cancel_requested:
        finish_job(session, claim=claim, status="cancelled", runtime_seconds=runtime_seconds)
        return False
    if attempts >= job.max_attempts:
        error = (reason, f"{reason}: no attempts left ({job.max_attempts} used)")
        finish_job(
            session, claim=claim, status="failed", error=error, runtime_seconds=runtime_seconds
        )
        return False
    pausing = job.status == "pausing"
    preempted = not pausing and job.release_requested and job.release_reason == "preempted"
    if preempted and reason == "shutdown":
        reason = "preempted"
    values: dict[str, Any] = {
        "status": "paused" if pausing else "queued",
        "attempts": attempts,
        "worker": None,
        "release_requested": False,
        "release_reason": None,
        # The caller sends the message right after the commit (and clears this if
        # that fails), as the API does for a new job. A paused job is sent on resume.
        "enqueued_at": None if pausing else now,
        "queued_at": None if pausing else now,
    }
    if runtime_seconds is not None:
        values["runtime_seconds"] = runtime_seconds
    # Conditional on no cancel (and on the status read): one that lands after the read
    # above must not be lost; a resume of a pausing job since then re-queues it.
    requeued = session.execute(
        update(Job)
        .where(owned(claim), Job.cancel_requested.is_(False), Job.status == job.status)
        .values(**values)
    ).rowcount  # type: ignore[attr-defined]
    if not requeued:
        refreshed = session.execute(select(Job.cancel_requested).where(owned(claim))).first()
        if refreshed is not None and not refreshed.cancel_requested:
            return hand_back(
                session,
                claim=claim,
                reason=reason,
                counted=counted,
                runtime_seconds=runtime_seconds,
            )
        finish_job(session, claim=claim, status="cancelled", runtime_seconds=runtime_seconds)
        return False
    end_attempt(session, claim, reason="paused" if pausing else reason, now=now, counted=counted)
    if pausing:
        append_events(session, claim.job_id, [("status", {"status": "paused"})])
        return False
    events: list[tuple[str, dict[str, Any]]] = []
    if preempted:
        events.append(("status", {"status": "preempted"}))
    events.append(("status", {"status": "queued", "reason": reason}))
    append_events(session, claim.job_id, events)
    return True


def request_release(session: Session, *, worker: str) -> int:
    """Ask the runs of a shutting-down worker (those it leads or follows) to checkpoint and
    hand their jobs back."""
    # And the multi-node runs it follows (app/jobs/gangs.py): the whole group hands back.
    followed = (
        select(JobSlot.job_id)
        .where(JobSlot.worker == worker, JobSlot.slot > 0, JobSlot.lease == Job.lease)
        .correlate(Job)
    )
    return int(
        session.execute(
            update(Job)
            .where(or_(Job.worker == worker, Job.id.in_(followed)), Job.status == "running")
            .values(
                release_requested=True,
                # A preemption already asked keeps its reason: the job goes back queued
                # either way.
                release_reason=func.coalesce(Job.release_reason, "shutdown"),
            )
        ).rowcount  # type: ignore[attr-defined]
    )


def end_attempt(
    session: Session, claim: Claim, *, reason: str, now: datetime, counted: bool = True
) -> None:
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == claim.job_id, JobAttempt.attempt == claim.lease)
        .values(ended_at=now, reason=reason, counted=counted)
    )


def end_open_attempts(session: Session, job_id: str, *, reason: str, now: datetime) -> None:
    """Close the history row of a run that stopped without saying so (its worker died)."""
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
        .values(ended_at=now, reason=reason)
    )


def metric_row(job_id: str, metric: dict[str, Any]) -> dict[str, Any]:
    extra = {key: value for key, value in metric.items() if key not in (*METRIC_COLUMNS, "time")}
    return {
        "job_id": job_id,
        **{key: metric[key] for key in METRIC_COLUMNS},
        "time": datetime.fromtimestamp(metric["time"], UTC),
        "extra": extra,
    }


def metric_event_data(metric: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics as the stream sends them: the metrics endpoint's fields."""
    time = datetime.fromtimestamp(metric["time"], UTC).isoformat()
    return {key: value for key, value in metric.items() if key != "time"} | {"time": time}


def append_events(
    session: Session, job_id: str, events: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """Every job event is written here, by the API and the workers alike: and in the same
    transaction, the webhook deliveries that announce it (app/webhooks/outbox.py)."""
    now = utcnow()
    for kind, data in events:
        session.add(JobEvent(job_id=job_id, type=kind, data=data, created_at=now))
    session.flush()
    outbox.enqueue_deliveries(session, job_id=job_id, events=events, now=now)
