"""The reaper: finds runs whose worker died, and queued jobs (and files to validate)
whose message is gone.

Celery with Redis delivers at least once but not promptly: a SIGKILLed worker's
message comes back only after the visibility timeout (days), and a Redis restart or a
failed publish loses messages outright. The jobs table is the truth; this periodic
pass makes the broker agree with it. Rows are taken with FOR UPDATE SKIP LOCKED, so
any number of API processes can run it side by side (SQLite has one writer anyway).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, true, update
from sqlalchemy.orm import Session

from app.db import Database, utcnow
from app.files.models import DataFile
from app.files.usage import waits_for_validation
from app.jobs.idempotency import forget_expired
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES, append_events, end_open_attempts

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


def send_due_messages(
    session: Session,
    *,
    now: datetime,
    requeue_after: float,
    check_all: bool,
    in_broker: Callable[[], set[str]],
    send: Callable[[str], bool],
    report: ReapReport,
    after: str | None = None,
) -> tuple[str | None, bool]:
    """Send queued jobs that have no message: never sent, or sent long ago and no longer
    in the broker. `check_all` checks every queued job (the first pass after a start),
    a batch at a time from the job id `after`. A job waiting for a file's validation is
    never sent: the validation sends it.

    Returns (the id to go on from, whether every due job was seen). A failed send stops
    the pass, so that rows are not held locked while the broker is away.
    """
    overdue = Job.enqueued_at < now - timedelta(seconds=requeue_after)
    due = (Job.id > after if after else true()) if check_all else None
    query = select(Job.id, Job.enqueued_at).where(Job.status == "queued", ~waits_for_validation())
    query = query.where(due if due is not None else or_(Job.enqueued_at.is_(None), overdue))
    jobs = session.execute(
        query.order_by(Job.id).limit(BATCH).with_for_update(skip_locked=True)
    ).all()
    if not jobs:
        return after, True
    present = in_broker() if any(job.enqueued_at is not None for job in jobs) else set()
    checked: list[str] = []
    complete = len(jobs) < BATCH
    for job in jobs:
        if job.enqueued_at is None or job.id not in present:
            if not send(job.id):
                complete = False  # broker away: the next pass goes on from here
                break
            report.sent.append(job.id)
        checked.append(job.id)
    if checked:
        session.execute(
            update(Job).where(Job.id.in_(checked), Job.status == "queued").values(enqueued_at=now)
        )
    return (checked[-1] if checked else after), complete


def resend_lost_validations(
    session: Session,
    *,
    now: datetime,
    requeue_after: float,
    in_broker: Callable[[], set[str]],
    send: Callable[[str], bool],
    report: ReapReport,
    after: str | None = None,
) -> str | None:
    """Send again the validation of files still `validating` `requeue_after` seconds
    after their upload whose message the broker no longer holds (a failed publish, a
    Redis restart, a worker that died). A batch per pass, in id order from the file id
    `after`; returns where the next pass goes on (None: from the start again).
    """
    uploaded_before = now - timedelta(seconds=requeue_after)
    query = select(DataFile.id).where(
        DataFile.status == "validating", DataFile.created_at < uploaded_before
    )
    if after is not None:
        query = query.where(DataFile.id > after)
    file_ids = session.scalars(
        query.order_by(DataFile.id).limit(BATCH).with_for_update(skip_locked=True)
    ).all()
    if not file_ids:
        return None
    present = in_broker()  # task ids start with the file id, as with jobs
    checked = after
    for file_id in file_ids:
        if file_id not in present:
            if not send(file_id):
                return checked  # broker away: the next pass tries this file again
            report.validations.append(file_id)
        checked = file_id
    return checked if len(file_ids) == BATCH else None


def _once(scan: Callable[[], set[str]]) -> Callable[[], set[str]]:
    """One read of the broker per pass, however many parts of the pass need it."""
    found: list[set[str]] = []

    def scan_once() -> set[str]:
        if not found:
            found.append(scan())
        return found[0]

    return scan_once


class Reaper:
    """One pass: `run_once`; as a daemon thread: `start` / `stop`."""

    def __init__(
        self,
        database: Database,
        *,
        lease_timeout: float,
        requeue_after: float,
        interval: float,
        in_broker: Callable[[], set[str]],
        send: Callable[[str], bool],
        ring: Callable[[list[str]], None] = lambda job_ids: None,
        idempotency_ttl_hours: float | None = None,
        send_validation: Callable[[str], bool] | None = None,
    ) -> None:
        self.database = database
        self.send_validation = send_validation
        self._validation_cursor: str | None = None
        self.idempotency_ttl_hours = idempotency_ttl_hours
        self.ring = ring
        self.lease_timeout = lease_timeout
        self.requeue_after = requeue_after
        self.interval = interval
        self.in_broker = in_broker
        self.send = send
        self._first_pass = True
        self._startup_cursor: str | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> ReapReport:
        report = ReapReport()
        now = utcnow()
        in_broker = _once(self.in_broker)
        with self.database.session() as session:
            reap_lost_runs(session, now=now, lease_timeout=self.lease_timeout, report=report)
            session.commit()
        with self.database.session() as session:
            cursor, complete = send_due_messages(
                session,
                now=now,
                requeue_after=self.requeue_after,
                check_all=self._first_pass,
                in_broker=in_broker,
                send=self.send,
                report=report,
                after=self._startup_cursor,
            )
            session.commit()
        if self._first_pass:  # the startup check of every queued job, a batch per pass
            self._startup_cursor = cursor
            self._first_pass = not complete
        if self.send_validation is not None:
            with self.database.session() as session:
                self._validation_cursor = resend_lost_validations(
                    session,
                    now=now,
                    requeue_after=self.requeue_after,
                    in_broker=in_broker,
                    send=self.send_validation,
                    report=report,
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
