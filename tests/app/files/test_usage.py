"""What a file's validation does to the jobs waiting for it, on Postgres and on SQLite:
a valid file sends them (once), an invalid one fails them with its first error."""

from __future__ import annotations

from sqlalchemy import select

from app.db import Database
from app.files.models import JobFile
from app.files.usage import Recorded, blocking_file, record_validation
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.runs import sendable
from tests.app.files.stored_files import (
    CLASSIFICATION_STATS,
    TEXT_STATS,
    add_file,
    create_job,
    events,
    load_file,
    load_job,
    text_job_spec,
    valid_text_file,
)


def record(
    database: Database,
    file_id: str,
    status: str = "valid",
    kind: str | None = "text",
    errors: list[str] | None = None,
    stats: dict[str, object] | None = None,
) -> Recorded:
    with database.session() as session:
        recorded = record_validation(
            session,
            file_id=file_id,
            status=status,
            kind=kind,
            errors=errors or [],
            stats=TEXT_STATS if stats is None else stats,
        )
        session.commit()
    return recorded


def test_a_job_on_a_validating_file_is_stored_unsent_with_its_files_linked(
    database: Database,
) -> None:
    train, held_out = add_file(database), valid_text_file(database)
    job_id = create_job(database, text_job_spec(train, validation_file_id=held_out))

    job = load_job(database, job_id)
    assert job.status == "queued" and job.enqueued_at is None
    with database.session() as session:
        assert session.scalar(select(Job.id).where(Job.id == job_id, sendable())) is None
        links = session.execute(
            select(JobFile.file_id, JobFile.role).where(JobFile.job_id == job_id)
        ).all()
    assert sorted(links) == sorted([(train, "train"), (held_out, "validation")])


def test_a_valid_file_sends_each_job_waiting_only_for_it_once(database: Database) -> None:
    train, other = add_file(database), add_file(database)
    ready = create_job(database, text_job_spec(train))
    still_waiting = create_job(database, text_job_spec(train, validation_file_id=other))

    recorded = record(database, train)

    assert recorded == Recorded(recorded=True, to_send=[ready], failed=[])
    assert load_job(database, ready).enqueued_at is not None
    assert load_job(database, still_waiting).enqueued_at is None
    data_file = load_file(database, train)
    assert (data_file.status, data_file.kind, data_file.stats) == ("valid", "text", TEXT_STATS)
    assert data_file.errors == [] and data_file.validated_at is not None

    # A second delivery of the same validation changes nothing and sends nothing.
    assert record(database, train, status="invalid", errors=["late"]) == Recorded(recorded=False)
    assert load_file(database, train).status == "valid"

    assert record(database, other).to_send == [still_waiting]


def test_an_invalid_file_fails_its_queued_jobs_with_its_first_error(database: Database) -> None:
    train = add_file(database)
    first, second = (create_job(database, text_job_spec(train)) for _ in range(2))
    with database.session() as session:
        jobs_service.request_cancel(session, job_id=second)
        session.commit()
    errors = ["line 2: not valid JSON: Expecting value", "line 5: missing 'text'"]

    recorded = record(database, train, status="invalid", kind=None, errors=errors, stats={})

    assert recorded == Recorded(recorded=True, to_send=[], failed=[first])
    job = load_job(database, first)
    assert (job.status, job.error_type) == ("failed", "invalid_data")
    assert job.finished_at is not None and job.error_message is not None
    assert train in job.error_message and errors[0] in job.error_message
    assert "and 1 more errors" in job.error_message
    error = {"type": "invalid_data", "message": job.error_message}
    assert events(database, first)[-2:] == [
        ("error", error),
        ("status", {"status": "failed", "error": error}),
    ]
    assert load_job(database, second).status == "cancelled"  # left as it was
    assert record(database, train, status="invalid", errors=["again"]) == Recorded(recorded=False)


def test_a_valid_file_that_does_not_fit_the_waiting_model_fails_the_job(
    database: Database,
) -> None:
    train = add_file(database, format="csv")
    spec = text_job_spec(train)  # tiny-gpt: needs text
    job_id = create_job(database, spec)

    recorded = record(database, train, kind="classification", stats=CLASSIFICATION_STATS)

    assert recorded == Recorded(recorded=True, to_send=[], failed=[job_id])
    job = load_job(database, job_id)
    assert (job.status, job.error_type) == ("failed", "invalid_data")
    assert job.error_message is not None
    assert "dataset.file_id" in job.error_message and "tiny-gpt" in job.error_message


def test_a_validation_file_of_another_kind_fails_the_waiting_job(database: Database) -> None:
    train = valid_text_file(database)
    held_out = add_file(database)
    job_id = create_job(database, text_job_spec(train, validation_file_id=held_out))

    recorded = record(database, held_out, kind="prompt_completion")

    assert recorded.failed == [job_id] and recorded.to_send == []
    message = load_job(database, job_id).error_message
    assert message is not None and message.startswith("dataset.validation_file_id:")


def test_the_blocking_file_is_an_invalid_one_before_a_validating_one(database: Database) -> None:
    train, held_out = add_file(database), add_file(database)
    job_id = create_job(database, text_job_spec(train, validation_file_id=held_out))
    with database.session() as session:
        blocker = blocking_file(session, job_id=job_id)
        assert blocker is not None and blocker.status == "validating"

    record(database, held_out, status="invalid", errors=["empty file"])  # fails the job
    with database.session() as session:
        blocker = blocking_file(session, job_id=job_id)
        assert blocker is not None and blocker.id == held_out

    record(database, train)
    other_job = create_job(database, text_job_spec(train))
    with database.session() as session:
        assert blocking_file(session, job_id=other_job) is None
        assert blocking_file(session, job_id="job_000000000000000000000000") is None
