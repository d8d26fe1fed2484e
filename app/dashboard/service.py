"""The dashboard's numbers, each from one bounded query.

Counts by status are one GROUP BY (the (tenant, status) and (status, id) indexes);
jobs finished in the last hour are a range on `ix_jobs_finished_at`; the running list
is capped at `RUNNING_LIMIT`; the queue's head is the claim order's first `QUEUE_LIMIT`
(app/jobs/scheduling.py); tenants' usage is one grouped query per figure; workers are
the live presence keys their main processes write (worker/presence.py), found with
SCAN, never KEYS, which would block Redis.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import get_args

import redis
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.dashboard.schemas import (
    PRESENCE_KEY_PREFIX,
    Dashboard,
    FinishedCounts,
    PausedJob,
    QueuedJob,
    TenantUsageRow,
    WorkerPublic,
)
from app.db import utcnow
from app.jobs import scheduling
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES
from app.jobs.schemas import TERMINAL_STATUSES, JobStatus
from app.tenants import service as tenants_service

logger = logging.getLogger(__name__)

JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
RUNNING_LIMIT = 100
QUEUE_LIMIT = 20
TENANTS_LIMIT = 100
PAUSED_STATUSES = ("pausing", "paused")
# Enough for any fleet we expect; past it the list is cut rather than the page slowed.
WORKERS_LIMIT = 500
SCAN_COUNT = 100
FINISHED_WINDOW = timedelta(hours=1)


def count_by_status(
    session: Session, *where: ColumnElement[bool], statuses: Iterable[str]
) -> dict[str, int]:
    """The jobs matching `where` by status, each of `statuses` present (0 when none)."""
    query = select(Job.status, func.count()).where(*where).group_by(Job.status)
    return dict.fromkeys(statuses, 0) | dict(session.execute(query).all())


def running_jobs(
    session: Session, *where: ColumnElement[bool], limit: int = RUNNING_LIMIT
) -> list[Job]:
    """Running and cancelling jobs matching `where`, newest first, at most `limit`."""
    query = select(Job).where(Job.status.in_(LIVE_STATUSES), *where)
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))


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
    session: Session, *where: ColumnElement[bool], names: Sequence[str]
) -> dict[str, str]:
    """The live job matching `where` of each named worker (the newest, should one run
    several)."""
    if not names:
        return {}
    query = (
        select(Job.worker, Job.id)
        .where(Job.status.in_(LIVE_STATUSES), Job.worker.in_(names), *where)
        .order_by(Job.id)
    )
    return {worker: job_id for worker, job_id in session.execute(query) if worker is not None}


def queue_head(
    session: Session,
    *where: ColumnElement[bool],
    now: datetime,
    policy: scheduling.Policy,
    limit: int = QUEUE_LIMIT,
) -> list[QueuedJob]:
    """The first `limit` queued jobs matching `where` in claim order, each numbered within
    its device count's queue (quotas aside, as the job GET's queue_position)."""
    rank = scheduling.ranking(now, policy, devices=None)
    position = func.row_number().over(partition_by=Job.devices, order_by=rank.order) - 1
    numbered = rank.query.add_columns(position.label("queue_position")).subquery()
    query = (
        select(Job, numbered.c.queue_position)
        .join(numbered, numbered.c.id == Job.id)
        .where(*where)
        .order_by(numbered.c.queue_position, Job.devices, Job.id)
        .limit(limit)
    )
    return [
        QueuedJob.model_validate(
            {
                "id": job.id,
                "name": job.name,
                "tenant": job.tenant,
                "priority": job.priority,
                "devices": job.devices,
                "queue_position": int(queue_position),
                "created_at": job.created_at,
            }
        )
        for job, queue_position in session.execute(query)
    ]


def paused_jobs(
    session: Session, *where: ColumnElement[bool], limit: int = RUNNING_LIMIT
) -> list[Job]:
    """Paused and pausing jobs matching `where`, newest first, at most `limit`."""
    query = select(Job).where(Job.status.in_(PAUSED_STATUSES), *where)
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))


def read_dashboard(
    session: Session,
    client: redis.Redis,
    *,
    queue: str,
    tenant: str | None,
    policy: scheduling.Policy,
) -> Dashboard:
    """Everything `GET /v1/dashboard` shows, for the jobs `tenant` may see (None: all)."""
    now = utcnow()
    visible = [] if tenant is None else [Job.tenant == tenant]
    finished = [Job.finished_at >= now - FINISHED_WINDOW, Job.status.in_(TERMINAL_STATUSES)]
    workers = live_workers(client)
    # Another tenant's job stays hidden; the worker does not.
    jobs = jobs_of_workers(session, *visible, names=[worker.name for worker in workers])
    for worker in workers:
        worker.job_id = jobs.get(worker.name)
    return Dashboard(
        counts=count_by_status(session, *visible, statuses=JOB_STATUSES),
        queue_depth=client.llen(queue),
        running=running_jobs(session, *visible),
        queue=queue_head(session, *visible, now=now, policy=policy),
        paused=[PausedJob.model_validate(job) for job in paused_jobs(session, *visible)],
        tenants=[
            TenantUsageRow(name=name, **usage.model_dump())
            for name, usage in tenants_service.usage_by_tenant(
                session,
                tenant=tenant,
                fair_share_window_seconds=policy.fair_share_window_seconds,
                limit=TENANTS_LIMIT,
            ).items()
        ],
        workers=workers,
        finished_last_hour=FinishedCounts.model_validate(
            count_by_status(session, *visible, *finished, statuses=TERMINAL_STATUSES)
        ),
        time=now,
    )
