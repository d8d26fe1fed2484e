"""Idempotent submits: the same Idempotency-Key and body from a tenant is one job.

The key's row is inserted in the transaction that creates the job. A tenant's submits
take turns (`jobs_service.lock_tenant`), so of two identical submits racing, the second
finds the first's key and replays its job; the primary key (tenant, key) backs that up.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.exceptions import IdempotencyKeyReused
from app.jobs.models import IdempotencyKey, Job
from app.jobs.schemas import as_utc
from app.jobs.spec import JobSpec


def request_hash(spec: JobSpec) -> str:
    """Of the normalised spec: key order and defaults spelled out or not do not matter."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay(
    session: Session, *, tenant: str, key: str, spec: JobSpec, ttl_hours: float
) -> Job | None:
    """The job an earlier submit with this key made; None for a new (or expired) key.
    The same key with another body raises IdempotencyKeyReused."""
    row = session.get(IdempotencyKey, (tenant, key))
    if row is None:
        return None
    created_at = as_utc(row.created_at)
    if created_at is not None and created_at < utcnow() - timedelta(hours=ttl_hours):
        session.delete(row)  # expired: the key may be used afresh
        session.flush()
        return None
    if row.request_hash != request_hash(spec):
        raise IdempotencyKeyReused(key)
    return session.get(Job, row.job_id)


def remember(session: Session, *, tenant: str, key: str, spec: JobSpec, job_id: str) -> None:
    session.add(
        IdempotencyKey(
            tenant=tenant,
            key=key,
            request_hash=request_hash(spec),
            job_id=job_id,
            created_at=utcnow(),
        )
    )
    session.flush()


def forget_expired(session: Session, *, ttl_hours: float, limit: int = 1000) -> int:
    """Delete keys past their lifetime (a bounded batch); the reaper calls it."""
    columns = (IdempotencyKey.tenant, IdempotencyKey.key)
    cutoff = utcnow() - timedelta(hours=ttl_hours)
    expired = select(*columns).where(IdempotencyKey.created_at < cutoff).limit(limit)
    deleted = session.execute(delete(IdempotencyKey).where(tuple_(*columns).in_(expired)))
    return int(deleted.rowcount)  # type: ignore[attr-defined]
