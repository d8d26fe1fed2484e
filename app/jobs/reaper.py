"""The reaper: finds runs whose worker died, and queued jobs (and files to validate)
whose message is gone.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db import Database, utcnow
from app.files.models import DataFile
from app.jobs.idempotency import forget_expired
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES, append_events, end_open_attempts, sendable

logger = logging.getLogger(__name__)

BATCH = 100


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
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
            values = {"status": "queued", "worker": None, "enqueued_at": None}
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
    session: Session, *, now: datetime, resend_after: float, send: Callable[[str], bool]
) -> list[str]:
    """Send the sendable jobs that have no message: never sent (or the send failed), or
    sent `resend_after` seconds ago and still not claimed, the message lost (a Redis
    restart, a worker killed between taking it and claiming the job). A duplicate is
    harmless, the claim refuses a job that is no longer queued; and each job sent is
    stamped, so it waits another `resend_after` before the next one.

    A batch per pass, oldest first; the ids sent. A failed send ends the pass, so that
    rows are not held locked while the broker is away.
    """
    overdue = Job.enqueued_at < now - timedelta(seconds=resend_after)
    due = session.scalars(
        select(Job.id)
        .where(sendable(), or_(Job.enqueued_at.is_(None), overdue))
        .order_by(Job.id)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    sent = list(itertools.takewhile(send, due))  # up to the first send that fails
    if sent:
        session.execute(update(Job).where(Job.id.in_(sent)).values(enqueued_at=now))
    return sent


def send_due_validations(
    session: Session,
    *,
    now: datetime,
    resend_after: float,
    sent_at: dict[str, datetime],
    send: Callable[[str], bool],
    after: str | None = None,
) -> tuple[list[str], str | None]:
    """Send again the validation of files still `validating` `resend_after` seconds after
    their upload and after this reaper last sent it (`sent_at`: file id -> when, kept
    by the caller): its message was lost, like a job's. A batch per pass, in id order
    from the file id `after`; returns the ids sent and where the next pass goes on
    (None: from the start again).
    """
    cutoff = now - timedelta(seconds=resend_after)
    for file_id in [file_id for file_id, at in sent_at.items() if at < cutoff]:
        del sent_at[file_id]  # due again, if still validating
    query = select(DataFile.id).where(DataFile.status == "validating", DataFile.created_at < cutoff)
    if after is not None:
        query = query.where(DataFile.id > after)
    file_ids = session.scalars(
        query.order_by(DataFile.id).limit(BATCH).with_for_update(skip_locked=True)
    ).all()
    sent: list[str] = []
    for file_id in file_ids:
        if file_id not in sent_at:
            if not send(file_id):
                return sent, after  # broker away: the next pass tries this file again
            sent_at[file_id] = now
            sent.append(file_id)
        after = file_id
    return sent, (after if len(file_ids) == BATCH else None)


class Reaper:
    """One pass: `run_once`; as a daemon thread: `start` / `stop`."""

    def __init__(
        self,
        database: Database,
        *,
        lease_timeout: float,
        requeue_after: float,
        interval: float,
        send: Callable[[str], bool],
        ring: Callable[[list[str]], None] = lambda job_ids: None,
        idempotency_ttl_hours: float | None = None,
        send_validation: Callable[[str], bool] | None = None,
    ) -> None:
        self.database = database
        self.lease_timeout = lease_timeout
        self.requeue_after = requeue_after
        self.interval = interval
        self.send = send
        self.ring = ring
        self.idempotency_ttl_hours = idempotency_ttl_hours
        self.send_validation = send_validation
        self._validations_sent: dict[str, datetime] = {}
        self._validation_cursor: str | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> ReapReport:
        report = ReapReport()
        now = utcnow()
        with self.database.session() as session:
            reap_lost_runs(session, now=now, lease_timeout=self.lease_timeout, report=report)
            session.commit()
        with self.database.session() as session:
            report.sent = send_due_jobs(
                session, now=now, resend_after=self.requeue_after, send=self.send
            )
            session.commit()
        if self.send_validation is not None:
            with self.database.session() as session:
                report.validations, self._validation_cursor = send_due_validations(
                    session,
                    now=now,
                    resend_after=self.requeue_after,
                    sent_at=self._validations_sent,
                    send=self.send_validation,
                    after=self._validation_cursor,
                )
                session.commit()
        if self.idempotency_ttl_hours is not None:
            with self.database.session() as session:
                forget_expired(session, ttl_hours=self.idempotency_ttl_hours)
                session.commit()
        if changed := report.requeued + report.failed + report.cancelled:
            self.ring(changed)  # their streams show the new status at once
        for kind in ("requeued", "failed", "cancelled", "sent", "validations"):
            if ids := getattr(report, kind):
                logger.info("reaper: %s %s", kind, ", ".join(ids))
        return report

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.run_once()
            except Exception:  # a database or broker blip: the next pass tries again
                logger.exception("reaper pass failed")
            self._stopped.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="trainjob-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
