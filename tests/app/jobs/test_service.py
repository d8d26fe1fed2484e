"""The jobs service and the worker's fenced writes, on Postgres and on SQLite."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import anyio
import pytest

from app.db import Database
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.exceptions import JobAlreadyFinished, JobNotFound
from app.jobs.models import JobEvent, JobMetric
from app.jobs.schemas import JobPublic
from app.jobs.spec import JobSpec
from app.reads import ThreadedReads

SPEC = {
    "model": {"type": "mlp"},
    "dataset": {"type": "digits"},
    "micro_batch_size": 4,
    "batch_size": 16,
    "max_steps": 3,
}


def create(database: Database, **changes: Any) -> str:
    with database.session() as session:
        job = jobs_service.create_job(session, spec=JobSpec.model_validate({**SPEC, **changes}))
        session.commit()
        return job.id


def test_created_job_is_queued_with_derived_batch_fields(database: Database) -> None:
    job_id = create(database, name="digits")
    with database.session() as session:
        job = jobs_service.get_job(session, job_id=job_id)
        public = JobPublic.model_validate(job)
        events, _ = jobs_service.job_rows(session, JobEvent.id, None, job_id=job_id, limit=10)
    assert public.status == "queued" and public.name == "digits"
    assert (public.batch_size, public.micro_batch_size, public.accumulation_steps) == (16, 4, 4)
    assert public.spec["accumulation_steps"] == 4
    assert public.progress.step == 0 and public.attempts == 0 and public.error is None
    assert [(e.type, e.data) for e in events] == [("status", {"status": "queued"})]


def test_unknown_or_malformed_ids_are_not_found(database: Database) -> None:
    with database.session() as session:
        for job_id in ["job_000000000000000000000000", "nope", "../etc/passwd", "job_' OR 1=1 --"]:
            with pytest.raises(JobNotFound):
                jobs_service.get_job(session, job_id=job_id)


def list_jobs(database: Database, **filters: Any) -> tuple[list[Any], bool]:
    """The job list's read (app/reads.py), on the synchronous engine."""
    read = functools.partial(jobs_service.read_jobs_page, ThreadedReads(database), **filters)
    return anyio.run(read)


def test_list_is_newest_first_and_pages_with_the_after_cursor(database: Database) -> None:
    created = []
    for _ in range(5):
        created.append(create(database))
        time.sleep(0.002)  # distinct milliseconds in the ids
    first, more = list_jobs(database, status=None, limit=2, after=None)
    second, more_2 = list_jobs(database, status=None, limit=2, after=first[-1].id)
    everything, _ = list_jobs(database, status=None, limit=100, after=None)
    newest = [job.id for job in everything if job.id in created]
    assert newest == created[::-1]
    assert [job.id for job in first + second] == [job.id for job in everything[:4]]
    assert more and more_2


def test_list_filters_by_status(database: Database) -> None:
    kept, cancelled = create(database), create(database)
    with database.session() as session:
        jobs_service.request_cancel(session, job_id=cancelled)
        session.commit()
    rows, _ = list_jobs(database, status="cancelled", limit=100, after=None)
    ids = {job.id for job in rows}
    assert cancelled in ids and kept not in ids


def test_cancel_of_a_queued_job_is_immediate_and_final(database: Database) -> None:
    job_id = create(database)
    with database.session() as session:
        job = jobs_service.request_cancel(session, job_id=job_id)
        session.commit()
        assert job.status == "cancelled" and job.finished_at is not None
        with pytest.raises(JobAlreadyFinished):
            jobs_service.request_cancel(session, job_id=job_id)
    with database.session() as session:
        assert (
            runs.claim_job(session, job_id=job_id, worker="w", lease_timeout=60) is None
        )  # never runs


def test_cancel_of_a_running_job_asks_the_worker(database: Database) -> None:
    job_id = create(database)
    with database.session() as session:
        claim = runs.claim_job(session, job_id=job_id, worker="w", lease_timeout=60)
        session.commit()
        assert claim is not None
        job = jobs_service.request_cancel(session, job_id=job_id)
        session.commit()
        assert job.status == "cancelling" and job.cancel_requested
        assert jobs_service.request_cancel(session, job_id=job_id).status == "cancelling"
        cancel = runs.record_progress(session, claim=claim, job_values={}, metrics=[], events=[])
        session.commit()
    assert cancel.cancel_requested is True


def test_a_job_is_claimed_once(database: Database) -> None:
    job_id = create(database)
    with database.session() as session:
        first = runs.claim_job(session, job_id=job_id, worker="a", lease_timeout=60)
        second = runs.claim_job(session, job_id=job_id, worker="b", lease_timeout=60)
        session.commit()
    assert first is not None and (first.lease, first.attempt) == (1, 1)
    assert second is None


def metric(step: int) -> dict[str, Any]:
    return {
        "step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": 0.5, "samples_per_sec": 100.0,
        "micro_batch_size": 4, "time": time.time(), "epoch": 0, "eval_loss": 0.25,
    }  # fmt: skip


def test_progress_is_written_in_batches_and_read_back_in_step_order(database: Database) -> None:
    job_id = create(database)
    with database.session() as session:
        claim = runs.claim_job(session, job_id=job_id, worker="w", lease_timeout=60)
        assert claim is not None
        runs.record_progress(
            session, claim=claim, job_values={"step": 3}, metrics=[metric(s) for s in (1, 2, 3)],
            events=[("oom_backoff", {"old_micro_batch_size": 4, "new_micro_batch_size": 2})],
        )  # fmt: skip
        session.commit()
        rows, more = jobs_service.job_rows(session, JobMetric.step, 1, job_id=job_id, limit=1)
        assert [(r.step, r.extra["eval_loss"]) for r in rows] == [(2, 0.25)] and more
        assert jobs_service.get_job(session, job_id=job_id).step == 3
        events, _ = jobs_service.job_rows(session, JobEvent.id, None, job_id=job_id, limit=10)
        kinds = ["status", "status", "metrics", "metrics", "metrics", "oom_backoff"]
        assert [e.type for e in events] == kinds
        assert [e.data["step"] for e in events if e.type == "metrics"] == [1, 2, 3]


def test_a_worker_that_lost_its_lease_cannot_write(database: Database) -> None:
    job_id = create(database)
    with database.session() as session:
        claim = runs.claim_job(session, job_id=job_id, worker="w", lease_timeout=60)
        session.commit()
    assert claim is not None
    stale = dataclasses.replace(claim, lease=claim.lease - 1)
    with database.session() as session:
        with pytest.raises(runs.LeaseLost):
            runs.record_progress(
                session, claim=stale, job_values={"step": 9}, metrics=[], events=[]
            )
        with pytest.raises(runs.LeaseLost):
            runs.finish_job(session, claim=stale, status="succeeded")
        session.rollback()
        runs.finish_job(session, claim=claim, status="failed", error=("nan_loss", "loss is nan"))
        session.commit()
        job = JobPublic.model_validate(jobs_service.get_job(session, job_id=job_id))
    assert job.status == "failed" and job.error is not None and job.error.type == "nan_loss"
    assert job.progress.step == 0 and job.finished_at is not None
