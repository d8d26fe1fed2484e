"""Publishing a job's (a file's) message, against the real Redis."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from app.ids import new_file_id, new_job_id
from app.queue import TRAIN_TASK, VALIDATE_TASK, enqueue_training, enqueue_validation
from app.settings import Settings
from tests.conftest import REDIS_URL
from worker.celery_app import make_celery


@pytest.fixture
def queue(queue_name: str, redis_client: redis.Redis) -> Iterator[str]:
    """A queue of this test's own, deleted afterwards."""
    name = f"{queue_name}-send-{secrets.token_hex(4)}"
    yield name
    redis_client.delete(name)


@pytest.fixture
def celery(queue: str, tmp_path: Path) -> Iterator[Celery]:
    app = make_celery(Settings(home=tmp_path, redis_url=REDIS_URL, queue=queue))
    yield app
    app.close()


def test_a_job_message_carries_its_id_and_nothing_else(
    celery: Celery, queue: str, redis_client: redis.Redis
) -> None:
    job_id = new_job_id()
    assert enqueue_training(celery, job_id=job_id, queue=queue) is True
    [raw] = redis_client.lrange(queue, 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["task"] == TRAIN_TASK
    assert headers["argsrepr"] == repr([job_id])
    assert headers["id"].startswith(f"{job_id}:")  # a log line's task id names its job


def test_a_validation_goes_to_the_queue_it_is_given(
    celery: Celery, queue: str, redis_client: redis.Redis
) -> None:
    files_queue, file_id = f"{queue}-files", new_file_id()
    try:
        assert enqueue_validation(celery, file_id=file_id, queue=files_queue)
        [raw] = redis_client.lrange(files_queue, 0, -1)
        headers = json.loads(raw)["headers"]
        assert (headers["task"], headers["argsrepr"]) == (VALIDATE_TASK, repr([file_id]))
        assert redis_client.llen(queue) == 0
    finally:
        redis_client.delete(files_queue)


def test_a_broker_that_cannot_be_reached_is_a_false_not_an_error(tmp_path: Path) -> None:
    unreachable = Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0", queue="nowhere")
    app = make_celery(unreachable)
    try:
        assert enqueue_training(app, job_id=new_job_id(), queue="nowhere") is False
    finally:
        app.close()


def test_validations_are_routed_to_the_files_queue(tmp_path: Path) -> None:
    app = make_celery(
        Settings(home=tmp_path, redis_url=REDIS_URL, queue="gpu-x", files_queue="files-x")
    )
    try:
        assert app.conf.task_routes[VALIDATE_TASK] == {"queue": "files-x"}
        assert app.conf.task_routes[TRAIN_TASK] == {"queue": "gpu-x"}
    finally:
        app.close()
