"""retry_database retries what a retry can get past (a connection refused or killed)
and raises at once what fails the same way every time (a broken constraint)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from app.db import Database
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.spec import JobSpec
from worker import progress_writer
from worker.progress_writer import retry_database

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "batch_size": 8,
        "micro_batch_size": 8, "max_steps": 1}  # fmt: skip


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_writer, "RETRY_PAUSE_SECONDS", 0.01)


def test_a_deterministic_error_is_raised_at_once_not_retried(database: Database) -> None:
    with database.session() as session:
        job_id = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC)).id
        session.commit()
    attempts = 0

    def insert_a_duplicate() -> None:
        nonlocal attempts
        attempts += 1
        with database.session() as session:
            existing = session.get(Job, job_id)
            assert existing is not None
            if attempts == 1:  # the same id again: a primary key violation
                session.execute(
                    text("INSERT INTO jobs SELECT * FROM jobs WHERE id = :id"), {"id": job_id}
                )
            session.commit()

    started = time.monotonic()
    with pytest.raises(IntegrityError):
        retry_database(insert_a_duplicate, give_up_seconds=60.0, what="a duplicate")
    assert attempts == 1
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:1/trainjob",  # nothing listens: refused
        "sqlite:////nonexistent-directory/trainjob.db",  # cannot be opened (yet)
    ],
)
def test_a_database_that_cannot_be_reached_is_retried_until_the_deadline(url: str) -> None:
    unreachable = Database(url)
    attempts = 0

    def select_one() -> None:
        nonlocal attempts
        attempts += 1
        with unreachable.session() as session:
            session.execute(text("SELECT 1"))

    with pytest.raises(OperationalError):
        retry_database(select_one, give_up_seconds=0.3, what="a ping")
    unreachable.dispose()
    assert attempts > 1


def test_a_killed_connection_is_retried_and_then_succeeds(postgres_url: str) -> None:
    database = Database(postgres_url)
    attempts = 0

    def killed_once() -> int:
        nonlocal attempts
        attempts += 1
        with database.session() as session:
            if attempts == 1:
                session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            return int(session.execute(text("SELECT 1")).scalar_one())

    try:
        assert retry_database(killed_once, give_up_seconds=30.0, what="a query") == 1
    finally:
        database.dispose()
    assert attempts == 2
