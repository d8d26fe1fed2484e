"""A file's validation as the worker's task runs it, on Postgres and on SQLite: the stored
bytes are checked, the result recorded once, and the jobs waiting for the file sent or
failed. Whatever goes wrong, the file does not stay `validating`."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from app.db import Database
from app.files.models import DataFile
from app.settings import Settings
from tests.app.files.stored_files import (
    add_file,
    create_job,
    load_file,
    load_job,
    text_job_spec,
)
from worker.datafiles import runner
from worker.datafiles.runner import validate_stored_file

TEXT = b'{"text": "the quick brown fox"}\n{"text": "jumps over"}\n{"text": "a lazy dog"}\n'
BAD_JSON = b'{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n'


class Sender:
    """The task's `enqueue`: records what it was asked to send."""

    def __init__(self, reachable: bool = True) -> None:
        self.reachable = reachable
        self.sent: list[str] = []

    def __call__(self, job_id: str, devices: int = 1) -> bool:
        if self.reachable:
            self.sent.append(job_id)
        return self.reachable


def test_a_valid_file_is_recorded_with_its_kind_and_stats_and_its_job_sent(
    database: Database, settings: Settings
) -> None:
    file_id = add_file(database, content=TEXT, chunk_bytes=16)  # several chunks
    job_id = create_job(database, text_job_spec(file_id))
    send = Sender()

    validate_stored_file(file_id, settings, enqueue=send)

    data_file = load_file(database, file_id)
    assert (data_file.status, data_file.kind, data_file.errors) == ("valid", "text", [])
    assert data_file.stats is not None and data_file.stats["rows"] == 3
    assert data_file.stats["tokens"] == len(b"the quick brown foxjumps overa lazy dog")
    assert send.sent == [job_id]
    assert load_job(database, job_id).enqueued_at is not None

    validate_stored_file(file_id, settings, enqueue=send)  # a duplicate delivery
    assert send.sent == [job_id]


def test_an_invalid_file_says_which_line_and_fails_its_job(
    database: Database, settings: Settings
) -> None:
    file_id = add_file(database, content=BAD_JSON)
    job_id = create_job(database, text_job_spec(file_id))
    send = Sender()

    validate_stored_file(file_id, settings, enqueue=send)

    data_file = load_file(database, file_id)
    assert data_file.status == "invalid" and data_file.errors
    assert data_file.errors[0].startswith("line 3:")
    job = load_job(database, job_id)
    assert (job.status, job.error_type) == ("failed", "invalid_data")
    assert job.error_message is not None and data_file.errors[0] in job.error_message
    assert send.sent == []


def test_a_job_the_broker_could_not_take_is_left_unsent_for_the_reaper(
    database: Database, settings: Settings
) -> None:
    file_id = add_file(database, content=TEXT)
    job_id = create_job(database, text_job_spec(file_id))

    validate_stored_file(file_id, settings, enqueue=Sender(reachable=False))

    assert load_file(database, file_id).status == "valid"
    job = load_job(database, job_id)
    assert job.status == "queued" and job.enqueued_at is None


def test_a_crash_while_validating_records_invalid_with_the_reason(
    database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(path: Path, format: str) -> None:
        raise MemoryError

    monkeypatch.setattr(runner, "validate_file", crash)
    file_id = add_file(database, content=TEXT)

    validate_stored_file(file_id, settings, enqueue=Sender())

    data_file = load_file(database, file_id)
    assert data_file.status == "invalid" and data_file.validated_at is not None
    assert data_file.errors == [
        "the file could not be validated: an internal error (MemoryError); "
        "the worker's log has the details"
    ]


def test_stored_bytes_that_are_not_the_uploaded_ones_are_invalid(
    database: Database, settings: Settings
) -> None:
    file_id = add_file(database, content=TEXT)
    with database.session() as session:
        session.execute(update(DataFile).where(DataFile.id == file_id).values(sha256="0" * 64))
        session.commit()

    validate_stored_file(file_id, settings, enqueue=Sender())

    data_file = load_file(database, file_id)
    assert data_file.status == "invalid" and data_file.errors
    assert "do not match its upload" in data_file.errors[0]
    assert "upload it again" in data_file.errors[0]


def test_a_missing_or_settled_file_is_not_validated(
    database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(path: Path, format: str) -> None:
        raise AssertionError("validated a file that needs no validation")

    monkeypatch.setattr(runner, "validate_file", never)
    settled = add_file(database, status="valid", kind="text", stats={"rows": 1}, content=TEXT)

    validate_stored_file("file_000000000000000000000000", settings, enqueue=Sender())
    validate_stored_file(settled, settings, enqueue=Sender())

    assert load_file(database, settled).status == "valid"


def test_each_delivery_counts_itself_and_one_past_the_cap_records_invalid_unchecked(
    database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliveries whose worker process was killed (out of memory) recorded nothing; any
    further one, whoever sent it (Celery giving the message back, or the reaper), ends
    the file invalid instead of checking it again."""
    counted = add_file(database, content=TEXT)
    validate_stored_file(counted, settings, enqueue=Sender())
    assert load_file(database, counted).validation_attempts == 1

    def never(path: Path, format: str) -> None:
        raise AssertionError("checked a file whose validation kept killing its worker")

    monkeypatch.setattr(runner, "validate_file", never)
    file_id = add_file(database, content=TEXT)
    job_id = create_job(database, text_job_spec(file_id))
    with database.session() as session:  # as if killed this often already
        session.execute(
            update(DataFile)
            .where(DataFile.id == file_id)
            .values(validation_attempts=runner.MAX_VALIDATION_ATTEMPTS)
        )
        session.commit()

    validate_stored_file(file_id, settings, enqueue=Sender())

    data_file = load_file(database, file_id)
    assert data_file.status == "invalid" and data_file.errors
    assert data_file.errors[0].startswith("validation ran out of memory or crashed")
    assert load_job(database, job_id).error_type == "invalid_data"
