"""Tenants' settings and usage, and the checks a submit passes against them.

Usage is read from the runs (job_attempts × the job's devices), so it needs no counter of
its own that a crash could leave wrong: see app/jobs/scheduling.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.service import TENANT_PATTERN
from app.db import utcnow
from app.errors import InvalidRequest
from app.jobs.models import Job
from app.jobs.scheduling import device_seconds_by_tenant, running_devices_by_tenant
from app.jobs.spec import JobSpec
from app.tenants.exceptions import (
    DeviceHoursQuotaExceeded,
    PriorityNotAllowed,
    QueuedQuotaExceeded,
)
from app.tenants.models import DEFAULT_SHARE, Tenant
from app.tenants.schemas import TenantPublic, TenantUpdate, TenantUsage

QUOTA_DAYS = 30


def check_name(name: str) -> None:
    if not TENANT_PATTERN.match(name):
        raise InvalidRequest(
            "a tenant is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            fields=[{"path": "name", "message": "invalid tenant name"}],
        )


def set_tenant(session: Session, *, name: str, update: TenantUpdate) -> Tenant:
    """Create or change the tenant's row with the fields sent."""
    check_name(name)
    tenant = session.get(Tenant, name)
    if tenant is None:
        tenant = Tenant(name=name, share=DEFAULT_SHARE)
        session.add(tenant)
    for field in update.model_fields_set:
        value = getattr(update, field)
        if field == "share" and value is None:
            value = DEFAULT_SHARE  # a share cannot be "none": back to the default
        setattr(tenant, field, value)
    session.flush()
    return tenant


def device_seconds(session: Session, *, tenant: str, since: datetime, now: datetime) -> float:
    query = device_seconds_by_tenant(since, now).having(Job.tenant == tenant)
    row = session.execute(query).first()
    return float(row.device_seconds or 0.0) if row is not None else 0.0


def usage(session: Session, *, tenant: str, fair_share_window_seconds: float) -> TenantUsage:
    now = utcnow()
    running = running_devices_by_tenant().having(Job.tenant == tenant)
    running_row = session.execute(running).first()
    queued = session.scalar(
        select(func.count()).where(Job.tenant == tenant, Job.status == "queued")
    )
    month = device_seconds(session, tenant=tenant, since=now - timedelta(days=QUOTA_DAYS), now=now)
    window = timedelta(seconds=fair_share_window_seconds)
    recent = device_seconds(session, tenant=tenant, since=now - window, now=now)
    return TenantUsage(
        running_devices=int(running_row.devices) if running_row is not None else 0,
        queued_jobs=int(queued or 0),
        device_hours_30d=round(month / 3600, 6),
        device_seconds_recent=round(recent, 3),
    )


def usage_by_tenant(
    session: Session, *, tenant: str | None, fair_share_window_seconds: float, limit: int
) -> dict[str, TenantUsage]:
    """`usage` of `tenant` (None: of every tenant with a run, a queued job or device time in
    the last 30 days, the first `limit` by name), with one grouped query per figure."""
    now = utcnow()
    window = timedelta(seconds=fair_share_window_seconds)

    def by_tenant(query: Any) -> dict[str, float]:
        if tenant is not None:
            query = query.having(Job.tenant == tenant)
        return {row[0]: float(row[1] or 0) for row in session.execute(query)}

    running = by_tenant(running_devices_by_tenant())
    queued = by_tenant(
        select(Job.tenant, func.count()).where(Job.status == "queued").group_by(Job.tenant)
    )
    month = by_tenant(device_seconds_by_tenant(now - timedelta(days=QUOTA_DAYS), now))
    recent = by_tenant(device_seconds_by_tenant(now - window, now))
    names = [tenant] if tenant is not None else sorted({*running, *queued, *month})[:limit]
    return {
        name: TenantUsage(
            running_devices=int(running.get(name, 0)),
            queued_jobs=int(queued.get(name, 0)),
            device_hours_30d=round(month.get(name, 0.0) / 3600, 6),
            device_seconds_recent=round(recent.get(name, 0.0), 3),
        )
        for name in names
    }


def public(session: Session, *, name: str, fair_share_window_seconds: float) -> TenantPublic:
    tenant = session.get(Tenant, name)
    settings: dict[str, Any] = {
        "share": tenant.share if tenant else DEFAULT_SHARE,
        **{
            field: getattr(tenant, field) if tenant else None
            for field in ("max_priority", "max_running_devices", "max_queued_jobs")
        },
        "max_device_hours": tenant.max_device_hours if tenant else None,
    }
    figures = usage(session, tenant=name, fair_share_window_seconds=fair_share_window_seconds)
    return TenantPublic(name=name, usage=figures, **settings)


def names_page(session: Session, *, limit: int, after: str | None) -> tuple[list[str], bool]:
    """Tenants by name: those with settings and those with jobs."""
    names = select(Tenant.name).union(select(Job.tenant).distinct()).subquery()
    query = select(names.c.name).order_by(names.c.name).limit(limit + 1)
    if after is not None:
        query = query.where(names.c.name > after)
    found = list(session.scalars(query))
    return found[:limit], len(found) > limit


def check_submit(
    session: Session, *, tenant: str, spec: JobSpec, key_max_priority: int | None
) -> None:
    """Refuse a submit over a cap or quota: a priority above the key's or tenant's
    max_priority (403), more queued jobs than max_queued_jobs (429), a tenant past its
    device-hours of the last 30 days (403). Run under the tenant's submit lock."""
    row = session.get(Tenant, tenant)
    if key_max_priority is not None and spec.priority > key_max_priority:
        raise PriorityNotAllowed(spec.priority, key_max_priority, "API key")
    if row is None:
        return
    if row.max_priority is not None and spec.priority > row.max_priority:
        raise PriorityNotAllowed(spec.priority, row.max_priority, "tenant")
    if row.max_queued_jobs is not None:
        queued = session.scalar(
            select(func.count()).where(Job.tenant == tenant, Job.status == "queued")
        )
        if (queued or 0) >= row.max_queued_jobs:
            raise QueuedQuotaExceeded(tenant, int(queued or 0), row.max_queued_jobs)
    if row.max_device_hours is not None:
        now = utcnow()
        since = now - timedelta(days=QUOTA_DAYS)
        used = device_seconds(session, tenant=tenant, since=since, now=now) / 3600
        if used >= row.max_device_hours:
            raise DeviceHoursQuotaExceeded(tenant, used, row.max_device_hours)
