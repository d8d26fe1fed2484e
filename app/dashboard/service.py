"""The dashboard's numbers, each from one bounded query.

Counts by status are one GROUP BY (the (tenant, status) and (status, id) indexes);
jobs finished in the last hour are a range on `ix_jobs_finished_at`; the running list
is capped at `RUNNING_LIMIT`; workers are the live presence keys their main processes
write (worker/presence.py), found with SCAN, never KEYS, which would block Redis.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import get_args

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dashboard.schemas import (
    PRESENCE_KEY_PREFIX,
    Dashboard,
    FinishedCounts,
    WorkerPublic,
)
from app.db import utcnow
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES
from app.jobs.schemas import TERMINAL_STATUSES, JobStatus

logger = logging.getLogger(__name__)

JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
RUNNING_LIMIT = 100
# Enough for any fleet we expect; past it the list is cut rather than the page slowed.
WORKERS_LIMIT = 500
SCAN_COUNT = 100
FINISHED_WINDOW = timedelta(hours=1)


def job_counts(session: Session, *, tenant: str | None) -> dict[str, int]:
    """Jobs by status, every status present (0 when none)."""
    query = select(Job.status, func.count()).group_by(Job.status)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    return dict.fromkeys(JOB_STATUSES, 0) | dict(session.execute(query).all())


def finished_since(session: Session, *, since: datetime, tenant: str | None) -> FinishedCounts:
    """Jobs that reached each terminal status at or after `since`."""
    query = (
        select(Job.status, func.count())
        .where(Job.finished_at >= since, Job.status.in_(TERMINAL_STATUSES))
        .group_by(Job.status)
    )
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    counts = dict.fromkeys(TERMINAL_STATUSES, 0) | dict(session.execute(query).all())
    return FinishedCounts.model_validate(counts)


def running_jobs(session: Session, *, tenant: str | None, limit: int = RUNNING_LIMIT) -> list[Job]:
    """Running and cancelling jobs, newest first, at most `limit`."""
    query = select(Job).where(Job.status.in_(LIVE_STATUSES)).order_by(Job.id.desc()).limit(limit)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    return list(session.scalars(query))


def live_workers(client: redis.Redis, *, limit: int = WORKERS_LIMIT) -> list[WorkerPublic]:
    """The workers whose presence key has not expired, by name; `job_id` left unset."""
    found = client.scan_iter(match=PRESENCE_KEY_PREFIX + "*", count=SCAN_COUNT)
    # SCAN may return a key twice; a key may expire between SCAN and MGET (None).
    keys = sorted(set(itertools.islice(found, limit)))
    workers = []
    for raw in client.mget(keys) if keys else []:
        if raw is None:
            continue
        try:
            workers.append(WorkerPublic.model_validate({**json.loads(raw), "job_id": None}))
        except (ValueError, TypeError):  # not JSON, or a record of another version
            logger.warning("dashboard: skipped an unreadable worker presence record")
    return sorted(workers, key=lambda worker: worker.name)


def jobs_of_workers(
    session: Session, *, names: Sequence[str], tenant: str | None
) -> dict[str, str]:
    """The live job of each named worker (the newest, should one run several)."""
    if not names:
        return {}
    query = (
        select(Job.worker, Job.id)
        .where(Job.status.in_(LIVE_STATUSES), Job.worker.in_(names))
        .order_by(Job.id)
    )
    if tenant is not None:  # another tenant's job stays hidden; the worker does not
        query = query.where(Job.tenant == tenant)
    return {worker: job_id for worker, job_id in session.execute(query) if worker is not None}


def read_dashboard(
    session: Session, client: redis.Redis, *, queue: str, tenant: str | None
) -> Dashboard:
    """Everything `GET /v1/dashboard` shows, for the jobs `tenant` may see (None: all)."""
    now = utcnow()
    workers = live_workers(client)
    jobs = jobs_of_workers(session, names=[worker.name for worker in workers], tenant=tenant)
    for worker in workers:
        worker.job_id = jobs.get(worker.name)
    return Dashboard(
        counts=job_counts(session, tenant=tenant),
        queue_depth=client.llen(queue),
        running=running_jobs(session, tenant=tenant),
        workers=workers,
        finished_last_hour=finished_since(session, since=now - FINISHED_WINDOW, tenant=tenant),
        time=now,
    )
