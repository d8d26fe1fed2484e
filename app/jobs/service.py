"""Jobs as the API sees them: create, read, list, cancel, and their metrics and events.

Services flush; the route commits. Writes a worker makes live in `app.jobs.runs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, func, select, text, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.auth.exceptions import Forbidden
from app.auth.service import DEFAULT_TENANT
from app.db import page, utcnow
from app.files import usage as files_usage
from app.ids import is_job_id, new_job_id
from app.jobs import idempotency, runs
from app.jobs.exceptions import (
    CudaNotSeen,
    JobAlreadyFinished,
    JobNotFound,
    TooManyJobs,
    TrackingNotConfigured,
)
from app.jobs.models import Job
from app.jobs.schemas import TERMINAL_STATUSES
from app.jobs.spec import FileDatasetSpec, JobSpec
from app.reads import Reads, Statement
from app.tenants import service as tenants_service


@dataclass(frozen=True)
class Submitted:
    job: Job
    replayed: bool  # an earlier submit with the same Idempotency-Key made it
    # The new job, when it may go to a worker now: the route sends it after the commit.
    to_send: list[str]


def submit_job(
    session: Session,
    *,
    spec: JobSpec,
    tenant: str,
    max_active_jobs: int,
    cuda_available: Callable[[], bool],
    most_devices: Callable[[], int | None] = lambda: None,
    idempotency_key: str | None = None,
    idempotency_ttl_hours: float = 48.0,
    admin: bool = True,
    key_max_priority: int | None = None,
    tracking_configured: bool = False,
) -> Submitted:
    """A submit: the earlier job of a known Idempotency-Key, else a new queued job, within
    the tenant's cap (TooManyJobs), on a device some worker has (CudaNotSeen) and, if it
    asks for tracking, on a service with a tracking server (TrackingNotConfigured)."""
    # An error rolls back with the request's session, which closes before the error is
    # answered: the tenant's lock below is never held while a client reads.
    lock_tenant(session, tenant=tenant)
    if idempotency_key is not None:
        earlier = idempotency.replay(
            session, tenant=tenant, key=idempotency_key, spec=spec, ttl_hours=idempotency_ttl_hours
        )
        if earlier is not None:
            return Submitted(earlier, replayed=True, to_send=[])
    if spec.device == "cuda" and not cuda_available():
        raise CudaNotSeen()
    if spec.tracking is not None and not tracking_configured:
        raise TrackingNotConfigured()
    if not spec.preemptible and not admin:
        raise Forbidden("only an admin key may submit a job with preemptible: false")
    tenants_service.check_submit(
        session, tenant=tenant, spec=spec, key_max_priority=key_max_priority
    )
    tenant_active = Job.tenant == tenant, Job.status.in_(runs.ACTIVE_STATUSES)
    active = session.scalar(select(func.count()).where(*tenant_active)) or 0
    if active >= max_active_jobs:
        raise TooManyJobs(tenant, active)
    job = create_job(session, spec=spec, tenant=tenant)
    if spec.devices > 1 and (most := most_devices()) is not None and most < spec.devices:
        # Not refused: a worker that big may start later; until then the user knows why.
        message = (
            f"the job needs {spec.devices} devices and no live worker has that many (the most "
            f"is {most}): it stays queued until one starts (trainjob worker --devices)"
        )
        runs.append_events(session, job.id, [("warning", {"message": message})])
    if idempotency_key is not None:
        idempotency.remember(session, tenant=tenant, key=idempotency_key, spec=spec, job_id=job.id)
    return Submitted(job, replayed=False, to_send=[job.id] if job.enqueued_at else [])


# The class id of the tenants' advisory locks (two-key form), apart from any other user's.
TENANT_LOCK_CLASS = 0x746A  # "tj"


def lock_tenant(session: Session, *, tenant: str) -> None:
    """Hold the tenant's submits back until this transaction ends, so that counting its
    active jobs and inserting one are one step: counted, then inserted, two concurrent
    submits at cap − 1 both saw room. Take it before the transaction reads anything."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # No tenant row to lock `FOR UPDATE` (a tenant is a name on its keys): a lock on
        # the name's hash, let go at commit or rollback. Two names sharing a hash only
        # wait for each other's submit.
        session.execute(
            text("SELECT pg_advisory_xact_lock(:lock_class, hashtext(:tenant))"),
            {"lock_class": TENANT_LOCK_CLASS, "tenant": tenant},
        )
    elif dialect == "sqlite":
        # SQLite has one writer at a time, but pysqlite sends BEGIN only before the first
        # write, so both counts would run before either insert: take the write lock first.
        connection = session.connection()
        if not getattr(connection.connection.dbapi_connection, "in_transaction", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_job(session: Session, *, spec: JobSpec, tenant: str = DEFAULT_TENANT) -> Job:
    """Insert a queued job for a validated spec. A file dataset's files must be the
    tenant's and fit the model (else InvalidRequest)."""
    files = spec.dataset if isinstance(spec.dataset, FileDatasetSpec) else None
    if files is not None:
        files_usage.check_dataset_files(
            session, dataset=files, model_type=spec.model.type, tenant=tenant
        )
    micro = spec.batch_size if spec.micro_batch_size == "auto" else spec.micro_batch_size
    assert isinstance(micro, int) and spec.batch_size is not None
    job = Job(
        id=new_job_id(),
        tenant=tenant,
        name=spec.name,
        status="queued",
        spec=spec.model_dump(mode="json"),
        batch_size=spec.batch_size,
        micro_batch_size=micro,
        accumulation_steps=spec.accumulation_steps or 1,
        devices=spec.devices,
        nodes=spec.nodes,
        min_nodes=spec.min_nodes,
        priority=spec.priority,
        preemptible=spec.preemptible,
        queued_at=utcnow(),
        max_steps=spec.max_steps,
        max_attempts=spec.max_attempts,
        # A new queued job on no file is sendable: stamped sent in its INSERT (an UPDATE
        # more per submit cost submits ~20 %, bench/api.py). One on files is marked below,
        # once they are linked; the counters start at their columns' defaults.
        enqueued_at=None if files is not None else utcnow(),
    )
    session.add(job)
    session.flush()
    if files is not None:
        files_usage.link_job_files(session, job_id=job.id, dataset=files)
        # Stamped sent unless a file is still validating (that validation sends the job).
        runs.mark_sent(session, job_ids=[job.id])
    runs.append_events(session, job.id, [("status", {"status": "queued"})])
    return job  # the caller sends it after the commit, if stamped sent


def get_job(session: Session, *, job_id: str, tenant: str | None = None) -> Job:
    """The job, or JobNotFound; with `tenant`, another tenant's job is not found either."""
    job = session.get(Job, job_id) if is_job_id(job_id) else None
    if job is None or (tenant is not None and job.tenant != tenant):
        raise JobNotFound(job_id)
    return job


JOBS = cast(Table, Job.__table__)


async def read_job(reads: Reads, *, job_id: str, tenant: str | None = None) -> Any:
    """The job GET's read: the job's row (its columns as attributes), or JobNotFound;
    with `tenant`, another tenant's job is not found either."""
    job = await reads.by_id(JOBS, job_id) if is_job_id(job_id) else None
    if job is None or (tenant is not None and job.tenant != tenant):
        raise JobNotFound(job_id)
    return job


@cache
def _jobs_page_query(*, by_tenant: bool, by_status: bool, after: bool) -> Statement:
    # One statement per combination of filters, so that each is compiled once.
    query = select(JOBS).order_by(JOBS.c.id.desc()).limit(bindparam("limit"))
    if by_tenant:
        query = query.where(JOBS.c.tenant == bindparam("tenant"))
    if by_status:
        query = query.where(JOBS.c.status == bindparam("status"))
    if after:
        query = query.where(JOBS.c.id < bindparam("after"))
    return query


async def read_jobs_page(
    reads: Reads,
    *,
    status: str | None,
    limit: int,
    after: str | None,
    tenant: str | None = None,
) -> tuple[list[Any], bool]:
    """Newest first; `after` is the id of the last job of the previous page."""
    query = _jobs_page_query(
        by_tenant=tenant is not None, by_status=status is not None, after=after is not None
    )
    filters = {"tenant": tenant, "status": status, "after": after}
    params = {"limit": limit + 1} | {name: v for name, v in filters.items() if v is not None}
    rows = await reads.all(query, params)
    return list(rows[:limit]), len(rows) > limit


def request_cancel(session: Session, *, job_id: str, tenant: str | None = None) -> Job:
    """Queued or paused: cancelled at once. Running (or pausing): cancelling until the
    worker stops at a window edge."""
    job = get_job(session, job_id=job_id, tenant=tenant)
    if job.status in TERMINAL_STATUSES:
        raise JobAlreadyFinished(job_id, job.status)
    if job.status == "cancelling":
        return job
    values: dict[str, Any] = {"status": "cancelling", "cancel_requested": True}
    if job.status in ("queued", "paused"):
        values |= {"status": "cancelled", "finished_at": utcnow()}
    # Conditional on the status we read, so a worker's claim and this cancel cannot both win.
    changed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == job.status).values(**values)
    ).rowcount  # type: ignore[attr-defined]
    session.expire(job)
    if not changed:  # the status moved under us: try again against the new one
        return request_cancel(session, job_id=job_id, tenant=tenant)
    runs.append_events(session, job_id, [("status", {"status": values["status"]})])
    return job


def job_rows(
    session: Session,
    cursor: InstrumentedAttribute[int],
    after: int | None,
    *,
    job_id: str,
    limit: int,
    tenant: str | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> tuple[list[Any], bool]:
    """A page of the job's rows of `cursor`'s table (metrics, events, ...) in `cursor`
    order, from the value `after`, of those that match `where` (events of some types);
    JobNotFound when `tenant` may not see the job."""
    get_job(session, job_id=job_id, tenant=tenant)
    model = cursor.class_
    query = select(model).where(model.job_id == job_id, *where).order_by(cursor)
    if after is not None:
        query = query.where(cursor > after)
    return page(session, query, limit)


@dataclass(frozen=True)
class Resumed:
    job: Job
    # The job, when it went back to the queue: the route sends it after the commit.
    to_send: list[str]


def request_pause(session: Session, *, job_id: str, tenant: str | None = None) -> Job:
    """Queued: paused at once (it keeps its checkpoints, if any). Running: `pausing` until
    the worker stops at its next optimizer step, checkpoints and frees the device; then
    `paused`. Paused or pausing already: unchanged. Finished or cancelling: 409."""
    job = get_job(session, job_id=job_id, tenant=tenant)
    if job.status in TERMINAL_STATUSES or job.status == "cancelling":
        raise JobAlreadyFinished(job_id, job.status)
    if job.status in ("paused", "pausing"):
        return job
    if job.status == "queued":
        values: dict[str, Any] = {"status": "paused", "enqueued_at": None, "held_by": None}
    else:
        values = {"status": "pausing", "release_requested": True, "release_reason": "pause"}
    changed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == job.status).values(**values)
    ).rowcount  # type: ignore[attr-defined]
    session.expire(job)
    if not changed:  # the status moved under us: try again against the new one
        return request_pause(session, job_id=job_id, tenant=tenant)
    runs.append_events(session, job_id, [("status", {"status": values["status"]})])
    return job


def request_resume(session: Session, *, job_id: str, tenant: str | None = None) -> Resumed:
    """Paused: queued again (the route sends it after the commit), resuming from its latest
    checkpoint. Pausing: running on, as if never paused. Queued or running: unchanged.
    Finished or cancelling: 409."""
    job = get_job(session, job_id=job_id, tenant=tenant)
    if job.status in TERMINAL_STATUSES or job.status == "cancelling":
        raise JobAlreadyFinished(job_id, job.status)
    if job.status not in ("paused", "pausing"):
        return Resumed(job, to_send=[])
    if job.status == "paused":
        now = utcnow()
        values: dict[str, Any] = {"status": "queued", "queued_at": now}
        # Sendable now unless a file it trains on is still validating (that sends it).
        blocker = files_usage.blocking_file(session, job_id=job_id)
        validating = blocker is not None and blocker.status == "validating"
        values["enqueued_at"] = None if validating else now
    else:
        values = {"status": "running", "release_requested": False, "release_reason": None}
    changed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == job.status).values(**values)
    ).rowcount  # type: ignore[attr-defined]
    session.expire(job)
    if not changed:
        return request_resume(session, job_id=job_id, tenant=tenant)
    runs.append_events(
        session, job_id, [("status", {"status": values["status"], "reason": "resumed"})]
    )
    to_send = [job_id] if values.get("enqueued_at") is not None else []
    return Resumed(job, to_send=to_send)
