"""A file's validation on a real worker process: the message goes through Redis, the
task checks the stored bytes, the file becomes valid or invalid, and the jobs that
waited for it train or fail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import Database
from app.queue import enqueue_validation
from app.settings import Settings
from tests.app.files.stored_files import add_file, create_job, load_file, load_job, text_job_spec
from tests.conftest import REDIS_URL, wait_for
from tests.processes import running, service_env
from worker.celery_app import make_celery

TEXT = "".join(f'{{"text": "line {i} of some text to learn"}}\n' for i in range(16)).encode()
BAD = TEXT + b'{"text": 42}\n'


@pytest.fixture
def worker_settings(postgres_url: str, queue_name: str, tmp_path: Path) -> Iterator[Settings]:
    """One worker on its own queue, against the session's Postgres database."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=postgres_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-validate",
        progress_flush_seconds=0.2,
    )
    env = service_env(
        home=str(settings.home),
        database_url=postgres_url,
        redis_url=REDIS_URL,
        queue=settings.queue,
        progress_flush_seconds="0.2",
    )
    with running(["worker"], env, tmp_path / "worker.log"):
        yield settings


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
                assert enqueue_validation(celery, file_id=file_id, queue=worker_settings.queue)
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
