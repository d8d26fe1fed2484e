"""A file's validation on a real worker process: the message goes through Redis (the
files queue), the task checks the stored bytes, the file becomes valid or invalid, and
the jobs that waited for it train or fail. A validation that kills its worker process
is not delivered forever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import Database
from app.queue import enqueue_validation
from app.settings import Settings
from tests.app.files.stored_files import add_file, create_job, load_file, load_job, text_job_spec
from tests.conftest import REDIS_URL, wait_for
from tests.processes import api_and_worker, running, service_env
from worker.celery_app import make_celery
from worker.datafiles.runner import MAX_VALIDATION_ATTEMPTS

TEXT = "".join(f'{{"text": "line {i} of some text to learn"}}\n' for i in range(16)).encode()
BAD = TEXT + b'{"text": 42}\n'


@pytest.fixture
def worker_settings(own_postgres_url: str, queue_name: str, tmp_path: Path) -> Iterator[Settings]:
    """One worker on its own queue and database (it claims the best queued job there)."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=own_postgres_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-validate",
        files_queue=f"{queue_name}-validate-files",
        progress_flush_seconds=0.2,
    )
    with running(["worker"], worker_env(settings), tmp_path / "worker.log"):
        yield settings


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    assert settings.database_url is not None
    return service_env(
        home=str(settings.home),
        database_url=settings.database_url,
        redis_url=REDIS_URL,
        queue=settings.queue,
        files_queue=settings.files_queue,
        progress_flush_seconds="0.2",
        **extra,
    )


def test_the_worker_validates_files_and_settles_the_jobs_waiting_for_them(
    worker_settings: Settings,
) -> None:
    database = Database(worker_settings.effective_database_url)
    try:
        good, bad = add_file(database, content=TEXT), add_file(database, content=BAD)
        trains = create_job(database, text_job_spec(good))
        fails = create_job(database, text_job_spec(bad))
        celery = make_celery(worker_settings)
        try:
            for file_id in (good, bad):
                assert enqueue_validation(
                    celery, file_id=file_id, queue=worker_settings.files_queue
                )
        finally:
            celery.close()

        def finished(job_id: str) -> str | None:
            status = load_job(database, job_id).status
            return status if status in {"succeeded", "failed", "cancelled"} else None

        assert wait_for(lambda: finished(fails), 60, "the job on the invalid file") == "failed"
        assert wait_for(lambda: finished(trains), 120, "the job on the valid file") == "succeeded"

        valid = load_file(database, good)
        assert (valid.status, valid.kind) == ("valid", "text")
        assert valid.stats is not None and valid.stats["rows"] == 16
        invalid = load_file(database, bad)
        assert invalid.status == "invalid" and invalid.errors
        assert invalid.errors[0].startswith("line 17:")
        job = load_job(database, fails)
        assert job.error_type == "invalid_data" and job.attempts == 0
        assert job.error_message is not None and invalid.errors[0] in job.error_message
        assert load_job(database, trains).step == 3
    finally:
        database.dispose()


@pytest.fixture
def files_only_settings(own_postgres_url: str, queue_name: str, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=own_postgres_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-files-only",
        files_queue=f"{queue_name}-files-only-files",
    )


def test_an_uploaded_file_is_validated_by_a_worker_that_consumes_only_the_files_queue(
    files_only_settings: Settings, tmp_path: Path
) -> None:
    settings = files_only_settings
    assert settings.database_url is not None
    worker_log = tmp_path / "files-worker.log"
    with (
        api_and_worker(
            tmp_path,
            with_worker=False,
            database_url=settings.database_url,
            redis_url=REDIS_URL,
            queue=settings.queue,
            files_queue=settings.files_queue,
            home=str(settings.home),
        ) as client,
        running(["worker", "--queues", settings.files_queue], worker_env(settings), worker_log),
    ):
        created = client.post("/v1/files", files={"file": ("train.jsonl", TEXT)}).json()

        def settled() -> dict[str, object] | None:
            found: dict[str, object] = client.get(f"/v1/files/{created['id']}").json()
            return found if found["status"] != "validating" else None

        found = wait_for(settled, 60, "the files worker to validate the upload")
    assert (found["status"], found["kind"]) == ("valid", "text")
    # A worker that trains nothing never imports torch for a validation.
    assert "preloaded the engine" not in worker_log.read_text()


def test_a_validation_whose_worker_process_is_killed_twice_ends_invalid(
    files_only_settings: Settings, tmp_path: Path
) -> None:
    """The validation SIGKILLs its own pool child (TRAINJOB_TEST_FAULTS=kill_validation),
    as the OOM killer would: Celery gives the message back each time, and the delivery
    after the last allowed attempt records the file invalid instead of checking it."""
    settings = files_only_settings
    database = Database(settings.effective_database_url)
    log = tmp_path / "worker.log"
    env = worker_env(settings, test_faults="kill_validation")
    try:
        file_id = add_file(database, content=TEXT)
        job_id = create_job(database, text_job_spec(file_id))
        with running(["worker", "--queues", settings.files_queue], env, log) as worker:
            celery = make_celery(settings)
            try:
                assert enqueue_validation(celery, file_id=file_id, queue=settings.files_queue)
            finally:
                celery.close()

            def settled() -> str | None:
                status = load_file(database, file_id).status
                return None if status == "validating" else status

            assert wait_for(settled, 120, "the killed validation to be settled") == "invalid"
            assert worker.poll() is None, "the worker itself must survive its children"
        data_file = load_file(database, file_id)
        assert data_file.errors == [
            "validation ran out of memory or crashed: the worker process checking this file "
            f"was killed {MAX_VALIDATION_ATTEMPTS} times (the worker's log has the details)"
        ]
        assert data_file.validation_attempts == MAX_VALIDATION_ATTEMPTS + 1
        assert log.read_text().count("SIGKILL") >= MAX_VALIDATION_ATTEMPTS
        job = load_job(database, job_id)
        assert (job.status, job.error_type) == ("failed", "invalid_data")
    finally:
        database.dispose()
