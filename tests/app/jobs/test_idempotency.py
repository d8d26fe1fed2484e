"""Idempotency keys expire: the reaper forgets them a bounded batch at a time."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.db import Database, utcnow
from app.jobs import idempotency
from app.jobs.models import IdempotencyKey
from app.jobs.spec import JobSpec
from tests.app.jobs.helpers import SPEC, create


def test_expired_keys_are_forgotten_a_batch_at_a_time_and_fresh_ones_kept(
    database: Database,
) -> None:
    job_id = create(database)
    spec = JobSpec.model_validate(SPEC)
    with database.session() as session:
        for key in ("old-1", "old-2", "fresh"):
            idempotency.remember(session, tenant="t", key=key, spec=spec, job_id=job_id)
        old = session.scalars(select(IdempotencyKey).where(IdempotencyKey.key != "fresh"))
        for row in old:
            row.created_at = utcnow() - timedelta(hours=3)
        session.commit()

    forgotten = []
    for _ in range(3):
        with database.session() as session:
            forgotten.append(idempotency.forget_expired(session, ttl_hours=2, limit=1))
            session.commit()

    assert forgotten == [1, 1, 0]
    with database.session() as session:
        assert session.scalars(select(IdempotencyKey.key)).all() == ["fresh"]
