"""Jobs and runs made through the services, and read back, for the tests of this package."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from app.db import Database, utcnow
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import Job, JobAttempt, JobEvent, JobMetric
from app.jobs.schemas import as_utc
from app.jobs.spec import JobSpec

SPEC = {
    "model": {"type": "mlp"},
    "dataset": {"type": "digits"},
    "batch_size": 8,
    "micro_batch_size": 8,
    "max_steps": 10,
}
LEASE = 60.0


def create(database: Database, **changes: Any) -> str:
    with database.session() as session:
        job = jobs_service.create_job(session, spec=JobSpec.model_validate({**SPEC, **changes}))
        session.commit()
        return job.id


def claim(database: Database, job_id: str, worker: str) -> runs.Claim:
    with database.session() as session:
        taken = runs.claim_job(session, job_id=job_id, worker=worker, lease_timeout=LEASE)
        session.commit()
    assert taken is not None, f"{worker} could not claim {job_id}"
    return taken


def try_claim(database: Database, job_id: str, worker: str) -> runs.Claim | None:
    with database.session() as session:
        taken = runs.claim_job(session, job_id=job_id, worker=worker, lease_timeout=LEASE)
        session.commit()
    return taken


def age_heartbeat(database: Database, job_id: str, seconds: float) -> None:
    """As if the job's worker last renewed its lease `seconds` ago."""
    with database.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


def load(database: Database, job_id: str) -> Job:
    with database.session() as session:
        job = session.get(Job, job_id)
    assert job is not None
    return job


def attempt_rows(database: Database, job_id: str) -> list[JobAttempt]:
    with database.session() as session:
        rows, _ = jobs_service.job_rows(session, JobAttempt.attempt, None, job_id=job_id, limit=100)
    return rows


def metric_steps(database: Database, job_id: str) -> list[int]:
    with database.session() as session:
        query = select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
        return list(session.scalars(query))


def event_count(database: Database, job_id: str) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).where(JobEvent.job_id == job_id)) or 0


def last_event(database: Database, job_id: str) -> tuple[str, dict[str, Any]]:
    with database.session() as session:
        event = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
        ).first()
    assert event is not None
    return event.type, event.data


def metric(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "loss": 1.0 / step,
        "lr": 0.1,
        "grad_norm": 0.5,
        "samples_per_sec": 100.0,
        "micro_batch_size": 8,
        "time": time.time(),
    }


def set_enqueued_at(database: Database, job_id: str, seconds_ago: float | None) -> datetime | None:
    """As if the job's message was published `seconds_ago` (None: never sent)."""
    moment = None if seconds_ago is None else utcnow() - timedelta(seconds=seconds_ago)
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=moment))
        session.commit()
    return moment


def enqueued_at(database: Database, job_id: str) -> datetime | None:
    return as_utc(load(database, job_id).enqueued_at)
