"""Log lines: JSON objects with the job's id and attempt inside a run, from the formatter
up to a real API and worker started with TRAINJOB_LOG_FORMAT=json."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import Database, upgrade
from app.jobs.runs import Claim
from app.observability.logs import TrainjobHandler, configure_logging, job_context
from app.settings import Settings
from tests.conftest import REDIS_URL, wait_for
from tests.processes import running, service_env, serving, wait_for_status
from worker.lease import LeaseKeeper


@pytest.fixture
def json_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """A JSON handler on the logger `test.logs`; returns what it wrote, line by line."""
    stream = io.StringIO()
    handler = TrainjobHandler("json")
    handler.setStream(stream)
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)


def test_lines_carry_job_id_and_attempt_inside_a_job_context_only(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    logger = logging.getLogger("test.logs")
    logger.info("before %s", "the run")
    with job_context("job_abc", 2):
        logger.warning("during")
    logger.info("after")

    before, during, after = json_lines()
    assert before["message"] == "before the run" and before["level"] == "INFO"
    assert before["logger"] == "test.logs" and before["time"].endswith("Z")
    assert "job_id" not in before and "attempt" not in before and "job_id" not in after
    assert during == during | {"job_id": "job_abc", "attempt": 2, "level": "WARNING"}


def test_extra_fields_are_kept_but_not_uvicorn_s_coloured_copy_of_the_message(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    logger = logging.getLogger("test.logs")
    logger.info("Started %s", "it", extra={"color_message": "\x1b[1mStarted\x1b[0m", "port": 1})
    [line] = json_lines()
    assert line["message"] == "Started it" and line["port"] == 1
    assert "color_message" not in line


def test_an_exception_is_one_line_with_its_traceback(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("test.logs").exception("it failed")
    [line] = json_lines()
    assert line["message"] == "it failed" and line["level"] == "ERROR"
    assert line["exc_info"].startswith("Traceback") and "ValueError: bad\nvalue" in line["exc_info"]


def test_configure_logging_keeps_one_handler_however_often_it_is_called(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        for log_format in ("text", "json", "json"):
            configure_logging(Settings(home=tmp_path, log_format=log_format, log_level="warning"))
        ours = [h for h in root.handlers if isinstance(h, TrainjobHandler)]
        assert len(ours) == 1 and root.level == logging.WARNING
    finally:
        root.handlers[:], root.level = saved
        logging.captureWarnings(False)
        logging.getLogger("alembic").setLevel(logging.NOTSET)


def test_the_lease_thread_logs_with_the_job_context_of_its_run(
    json_lines: Callable[[], list[dict[str, Any]]], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'trainjob.db'}"
    upgrade(url)
    database = Database(url)
    lease_logger = logging.getLogger("worker.lease")
    handler = logging.getLogger("test.logs").handlers[-1]
    lease_logger.addHandler(handler)
    # No such job: the first heartbeat finds the lease lost, and says so from its thread.
    claim = Claim("job_gone", lease=1, attempt=3, resumed_from_step=0, runtime_seconds=0.0)
    try:
        with job_context("job_gone", 3):
            keeper = LeaseKeeper(database, claim, heartbeat_seconds=0.01, max_runtime_seconds=None)
        keeper.start()
        wait_for(lambda: keeper.lost, 10, "the lease to be lost")
        keeper.stop()
    finally:
        lease_logger.removeHandler(handler)
        database.dispose()
    [line] = json_lines()
    assert "lease lost" in line["message"]
    assert line["job_id"] == "job_gone" and line["attempt"] == 3


SPEC: dict[str, Any] = {
    "model": {"type": "tiny-gpt", "n_layer": 1, "n_embd": 32, "block_size": 64},
    "dataset": {"type": "tiny-text"},
    "micro_batch_size": 4,
    "accumulation_steps": 3,
    "max_steps": 3,
    "optimizer": {"type": "adamw", "lr": 0.003},
    "device": "cpu",
}


# Written by Celery's signal handler straight to stdout, not through logging.
CELERY_SHUTDOWN_LINES = {"", "worker: Warm shutdown (MainProcess)"}


def parse_lines(log: Path) -> list[dict[str, Any]]:
    """Every line of the log as a JSON object: fails on the first that is not one."""
    parsed = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if line in CELERY_SHUTDOWN_LINES:
            continue
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{log.name}:{number} is not JSON: {line!r}") from None
    return parsed


@pytest.mark.slow
def test_a_real_api_and_worker_write_only_json_lines_with_the_job_on_every_line_of_its_run(
    tmp_path: Path, make_postgres_database: Callable[[], str], queue_name: str
) -> None:
    database_url = make_postgres_database()
    upgrade(database_url)
    env = service_env(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-logs",
        home=str(tmp_path / "home"),
        log_format="json",
    )
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    with (
        running(["worker"], env, worker_log),
        serving(env, api_log) as api,
        httpx.Client(base_url=api.url, timeout=10) as client,
    ):
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
        done = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, 60)
        assert done["status"] == "succeeded", done["error"]
        # Celery's last line for the task comes after the job's row says succeeded.
        deadline = time.monotonic() + 10
        while "succeeded in" not in worker_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)

    api_lines = parse_lines(api_log)
    assert any(line["message"].startswith("trainjob is serving at") for line in api_lines)
    access = [line for line in api_lines if line["logger"] == "uvicorn.access"]
    assert any("POST /v1/jobs HTTP" in line["message"] for line in access)

    worker_lines = parse_lines(worker_log)
    assert any(line["message"].endswith("ready.") for line in worker_lines)
    of_the_run = [line for line in worker_lines if "job_id" in line]
    assert of_the_run and all(
        line["job_id"] == job_id and line["attempt"] == 1 for line in of_the_run
    )
    # Celery's own lines about the task message (received, succeeded) name the job in
    # the task id but come before the claim and after the run: they have no attempt.
    naming_the_job = [
        line
        for line in worker_lines
        if job_id in line["message"] and not line["logger"].startswith("celery")
    ]
    assert naming_the_job and all(line in of_the_run for line in naming_the_job)
