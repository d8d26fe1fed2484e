"""The reaper: finds runs whose worker died, and queued jobs (and files to validate)
whose message is gone; and asks running jobs to make way for waiting ones of much higher
priority (preemption, app/jobs/scheduling.py).

Celery with Redis delivers at least once but not promptly: a SIGKILLed worker's
message comes back only after the visibility timeout (days), and a Redis restart or a
failed publish loses messages outright. The jobs table is the truth; this periodic
pass sends again what has waited too long, without asking the broker what it holds: a
duplicate message is harmless, as the claim refuses a job that is no longer queued.
Rows are taken with FOR UPDATE SKIP LOCKED, so any number of API processes can run it
side by side (SQLite has one writer anyway).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, and_, func, select, update
from sqlalchemy.orm import Session

from app.db import Database, utcnow
from app.files.models import DataFile
from app.jobs import gangs
from app.jobs.idempotency import forget_expired
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES, append_events, end_open_attempts, sendable
from app.jobs.scheduling import Capacity, Policy, hold_blocked_jobs, preempt_for_waiting
from app.queue import Sender

logger = logging.getLogger(__name__)

BATCH = 100


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # queued jobs a quota now holds back
    preempted: list[str] = field(default_factory=list)  # running jobs asked to hand back
    sent: list[str] = field(default_factory=list)
    validations: list[str] = field(default_factory=list)  # files whose validation was re-sent


def reap_lost_runs(
    session: Session, *, now: datetime, lease_timeout: float, report: ReapReport
) -> None:
    """Runs whose heartbeat is older than the lease: re-queue, or fail when out of attempts."""
    cutoff = now - timedelta(seconds=lease_timeout)
    jobs = session.execute(
        select(Job.id, Job.status, Job.lease, Job.attempts, Job.max_attempts)
        .where(Job.status.in_(LIVE_STATUSES), Job.heartbeat_at < cutoff)
        .order_by(Job.heartbeat_at)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    for job in jobs:
        if job.status == "cancelling":
            values: dict[str, Any] = {"status": "cancelled", "finished_at": now}
            data: dict[str, Any] = {"status": "cancelled"}
            outcome = report.cancelled
        elif job.status == "pausing":
            # Its worker died on the way: paused at its last checkpoint, as asked.
            values = {"status": "paused", "worker": None, "enqueued_at": None}
            values |= {"release_requested": False, "release_reason": None}
            outcome, data = report.paused, {"status": "paused", "reason": "worker_lost"}
        elif job.attempts >= job.max_attempts:
            message = (
                f"the worker stopped renewing its lease for {lease_timeout:g} s, "
                f"and all {job.max_attempts} attempts are used"
            )
            values = {
                "status": "failed",
                "finished_at": now,
                "error_type": "worker_lost",
                "error_message": message,
            }
            outcome = report.failed
            data = {"status": "failed", "error": {"type": "worker_lost", "message": message}}
        else:
            values = {"status": "queued", "worker": None, "enqueued_at": None, "queued_at": now}
            values |= {"release_requested": False, "release_reason": None}
            outcome, data = report.requeued, {"status": "queued", "reason": "worker_lost"}
        # Conditional on what was read: on SQLite there is no row lock.
        changed = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.lease == job.lease,
                Job.status == job.status,
                Job.heartbeat_at < cutoff,  # a heartbeat since the read keeps the job
            )
            .values(**values)
        ).rowcount  # type: ignore[attr-defined]
        if changed:
            end_open_attempts(session, job.id, reason="worker_lost", now=now)
            append_events(session, job.id, [("status", data)])
            outcome.append(job.id)


def send_due_jobs(
    session: Session,
    *,
    now: datetime,
    resend_after: float,
    waiting: Callable[[int], int],
    send: Sender,
) -> list[str]:
    """Send the sendable jobs never sent (or whose send failed), and again those whose
    message is lost: a Redis restart, a worker killed between taking it and claiming the
    job. A duplicate is harmless, the claim refuses a job no longer queued, but it costs
    a worker a fresh process: a job that merely waits its turn is not sent again.

    Each training queue (one per number of devices, app/queue.py) hands out its oldest
    message first: of its jobs sent, as many as there are more of them than messages
    `waiting(devices)` in it are lost, and they are those sent longest ago. Each of them
    sent `resend_after` ago or more is sent again, and stamped.

    A batch per pass; the ids sent. A failed send ends the pass, so that rows are not
    held locked while the broker is away.
    """
    jobs = select(Job.id, Job.devices)
    never_sent = jobs.where(sendable(), Job.enqueued_at.is_(None)).order_by(Job.id)
    due = list(_locked(session, never_sent, BATCH))
    sent_by_queue = session.execute(
        select(Job.devices, func.count())
        .where(sendable(), Job.enqueued_at.is_not(None))
        .group_by(Job.devices)
    ).all()
    overdue = Job.enqueued_at < now - timedelta(seconds=resend_after)
    for devices, count in sent_by_queue:
        lost_messages = jobs.where(sendable(), overdue, Job.devices == devices)
        lost = min(count - waiting(devices), BATCH)
        due += _locked(session, lost_messages.order_by(Job.enqueued_at), lost)
    # Up to the first send that fails.
    sent = [job[0] for job in itertools.takewhile(lambda job: send(job[0], job[1]), due)]
    if sent:
        session.execute(update(Job).where(Job.id.in_(sent)).values(enqueued_at=now))
    return sent


def send_jobs_now(
    session: Session, job_ids: Sequence[str], *, now: datetime, send: Sender
) -> list[str]:
    """Send these jobs (those still sendable), up to the first send that fails; the ids
    sent, stamped."""
    query = select(Job.id, Job.devices).where(Job.id.in_(job_ids), sendable()).order_by(Job.id)
    due = _locked(session, query, len(job_ids))
    sent = [job[0] for job in itertools.takewhile(lambda job: send(job[0], job[1]), due)]
    if sent:
        session.execute(update(Job).where(Job.id.in_(sent)).values(enqueued_at=now))
    return sent


def send_due_validations(
    session: Session,
    *,
    now: datetime,
    resend_after: float,
    waiting: int,
    sent_at: dict[str, datetime],
    send: Callable[[str], bool],
) -> list[str]:
    """Send again the validation of files still `validating` `resend_after` seconds after
    their upload whose message is lost, found as a job's is (`waiting`: the length of
    the files queue). `sent_at` (file id -> when, kept by the caller) stands in for a
    job's stamp: a file sent again waits another `resend_after`. The ids sent."""
    cutoff = now - timedelta(seconds=resend_after)
    for file_id in [file_id for file_id, at in sent_at.items() if at < cutoff]:
        del sent_at[file_id]
    validating = DataFile.status == "validating"
    lost = (session.scalar(select(func.count()).where(validating)) or 0) - waiting
    overdue = and_(DataFile.created_at < cutoff, DataFile.id.not_in(list(sent_at)))
    query = select(DataFile.id).where(validating, overdue).order_by(DataFile.id)
    due = [row[0] for row in _locked(session, query, min(lost, BATCH))]
    sent = list(itertools.takewhile(send, due))
    sent_at.update(dict.fromkeys(sent, now))
    return sent


def _locked(
    session: Session, query: Select[*tuple[Any, ...]], limit: int
) -> Sequence[Row[*tuple[Any, ...]]]:
    """Up to `limit` rows of `query`, of rows no other transaction holds, locked until the
    commit."""
    if limit <= 0:
        return []
    return session.execute(query.limit(limit).with_for_update(skip_locked=True)).all()


@dataclass(frozen=True)
class Preemption:
    """The settings preemption runs with (TRAINJOB_PREEMPT_GAP, TRAINJOB_MIN_RUN_SECONDS,
    the claim order's), and what the live workers can take now: None when unknown (Redis
    does not answer), and then nothing is preempted."""

    capacity: Callable[[Session], Capacity | None]
    gap: int
    min_run_seconds: float
    policy: Policy


@dataclass
class Reaper:
    """One pass: `run_once`; as a daemon thread: `start` / `stop`, and `wake` for a pass
    now rather than at the next interval."""

    database: Database
    _: KW_ONLY
    lease_timeout: float
    requeue_after: float
    interval: float
    send: Sender
    # How many messages wait in the training queue of jobs on so many devices, and in the
    # files queue.
    waiting: Callable[[int], int]
    validations_waiting: Callable[[], int] = lambda: 0
    ring: Callable[[list[str]], None] = lambda job_ids: None
    idempotency_ttl_hours: float | None = None
    send_validation: Callable[[str], bool] | None = None
    preemption: Preemption | None = None  # None: no job is preempted
    _validations_sent: dict[str, datetime] = field(default_factory=dict, init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)
    _woken: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def run_once(self) -> ReapReport:
        report = ReapReport()
        now = utcnow()
        # A transaction each: one part's failure does not undo the others.
        with self.database.sessions.begin() as session:
            reap_lost_runs(session, now=now, lease_timeout=self.lease_timeout, report=report)
        with self.database.sessions.begin() as session:
            # Slots of gangs whose run is over (app/jobs/gangs.py): their workers are free.
            gangs.delete_void_slots(session)
        with self.database.sessions.begin() as session:
            # A job a running-devices quota holds back says so once (a `warning` event);
            # one it lets go is sent again now.
            holds = hold_blocked_jobs(session, now=now)
            report.held = holds.held
        if holds.released:
            with self.database.sessions.begin() as session:
                report.sent += send_jobs_now(session, holds.released, now=now, send=self.send)
        with self.database.sessions.begin() as session:
            report.sent += send_due_jobs(
                session,
                now=now,
                resend_after=self.requeue_after,
                waiting=self.waiting,
                send=self.send,
            )
        if self.preemption is not None:
            with self.database.sessions.begin() as session:
                report.preempted = self._preempt(session, now=now)
        if self.send_validation is not None:
            with self.database.sessions.begin() as session:
                report.validations = send_due_validations(
                    session,
                    now=now,
                    resend_after=self.requeue_after,
                    waiting=self.validations_waiting(),
                    sent_at=self._validations_sent,
                    send=self.send_validation,
                )
        if self.idempotency_ttl_hours is not None:
            with self.database.sessions.begin() as session:
                forget_expired(session, ttl_hours=self.idempotency_ttl_hours)
        changed = report.requeued + report.failed + report.cancelled + report.paused + report.held
        changed += report.preempted
        if changed:
            self.ring(changed)  # their streams show the new status (or `preempting`) at once
        # The preempted ones are logged with the job each makes way for (_preempt).
        kinds = ("requeued", "failed", "cancelled", "paused", "held", "sent", "validations")
        for kind in kinds:
            if ids := getattr(report, kind):
                logger.info("reaper: %s %s", kind, ", ".join(ids))
        return report

    def _preempt(self, session: Session, *, now: datetime) -> list[str]:
        """Running jobs asked to hand their device back to a waiting job (each victim's
        worker sees the flag at its next progress write or heartbeat)."""
        assert self.preemption is not None
        capacity = self.preemption.capacity(session)
        if capacity is None:
            return []
        chosen = preempt_for_waiting(
            session,
            now=now,
            policy=self.preemption.policy,
            capacity=capacity,
            gap=self.preemption.gap,
            min_run_seconds=self.preemption.min_run_seconds,
        )
        for victim, waiting in chosen:
            logger.info("reaper: job %s asked to hand back its device to %s", victim, waiting)
        return [victim for victim, _ in chosen]

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.run_once()
            except Exception:  # a database or broker blip: the next pass tries again
                logger.exception("reaper pass failed")
            # A wake during the pass is not lost: the wait returns at once.
            self._woken.wait(self.interval)
            self._woken.clear()

    def wake(self) -> None:
        """Run a pass now (a job of high priority was submitted: preempt for it without
        waiting for the interval). Returns at once."""
        self._woken.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="trainjob-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
