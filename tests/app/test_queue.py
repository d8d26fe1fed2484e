"""Publishing a job's message, and finding which jobs Redis still holds a message for.

Against the real Redis: the reaper trusts this scan to decide whether to send a job again,
so it must read the exact shapes kombu writes.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from app import queue as queue_module
from app.files.ids import new_file_id
from app.jobs.ids import new_job_id
from app.queue import (
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    enqueue_training,
    enqueue_validation,
    job_ids_in_broker,
    task_id_for,
)
from app.settings import Settings
from tests.conftest import REDIS_URL
from worker.celery_app import make_celery


@pytest.fixture
def queue(queue_name: str, redis_client: redis.Redis) -> Iterator[str]:
    """A queue of this test's own, deleted afterwards."""
    name = f"{queue_name}-scan-{secrets.token_hex(4)}"
    yield name
    redis_client.delete(name)


@pytest.fixture
def celery(queue: str, tmp_path: Path) -> Iterator[Celery]:
    app = make_celery(Settings(home=tmp_path, redis_url=REDIS_URL, queue=queue))
    yield app
    app.close()


@pytest.fixture
def unacked(redis_client: redis.Redis) -> Iterator[list[str]]:
    """Fields this test adds to kombu's hash of delivered, unacknowledged messages."""
    fields: list[str] = []
    yield fields
    if fields:
        redis_client.hdel(UNACKED_KEY, *fields)
        redis_client.zrem(UNACKED_INDEX_KEY, *fields)


MAX_AGE = 300.0


def deliver(redis_client: redis.Redis, tag: str, entry: bytes | str, age: float = 0.0) -> None:
    """What kombu's Redis transport records when it hands a message to a worker."""
    redis_client.hset(UNACKED_KEY, tag, entry)
    redis_client.zadd(UNACKED_INDEX_KEY, {tag: time.time() - age})


def test_a_sent_job_is_found_until_its_message_is_gone(
    celery: Celery, queue: str, redis_client: redis.Redis
) -> None:
    job_id = new_job_id()
    assert enqueue_training(celery, job_id=job_id, queue=queue) is True
    [raw] = redis_client.lrange(queue, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["id"].startswith(f"{job_id}:")
    assert message["headers"]["argsrepr"] == repr([job_id])  # the id and nothing else
    assert job_id in job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)

    redis_client.delete(queue)  # Redis restarted without its data, say
    assert job_id not in job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)


def test_a_message_delivered_but_not_acknowledged_is_found(
    celery: Celery, queue: str, redis_client: redis.Redis, unacked: list[str]
) -> None:
    job_id = new_job_id()
    assert enqueue_training(celery, job_id=job_id, queue=queue)
    raw = redis_client.rpop(queue)  # a worker took it and runs it (acks late)
    assert isinstance(raw, bytes) and redis_client.llen(queue) == 0
    tag = f"test-{secrets.token_hex(8)}"
    unacked.append(tag)
    # kombu's Redis transport keeps [message, exchange, routing key] under the delivery tag.
    deliver(redis_client, tag, json.dumps([json.loads(raw), "", queue]))

    assert job_id in job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)


def test_a_hand_made_unacked_entry_in_kombus_shape_is_found(
    queue: str, redis_client: redis.Redis, unacked: list[str]
) -> None:
    job_id = new_job_id()
    message = {"body": "", "headers": {"id": task_id_for(job_id)}, "properties": {}}
    tag = f"test-{secrets.token_hex(8)}"
    unacked.append(tag)
    deliver(redis_client, tag, json.dumps([message, "", queue]))
    assert job_id in job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)


def test_an_old_delivery_of_a_never_claimed_job_does_not_count(
    queue: str, redis_client: redis.Redis, unacked: list[str]
) -> None:
    # A worker took the message and died before claiming: kombu would return it only
    # after the visibility timeout (days), so the reaper must send the job again.
    job_id = new_job_id()
    message = {"body": "", "headers": {"id": task_id_for(job_id)}, "properties": {}}
    tag = f"test-{secrets.token_hex(8)}"
    unacked.append(tag)
    deliver(redis_client, tag, json.dumps([message, "", queue]), age=MAX_AGE + 60)
    assert job_id not in job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)


def test_malformed_entries_are_skipped(
    celery: Celery, queue: str, redis_client: redis.Redis, unacked: list[str]
) -> None:
    job_id = new_job_id()
    garbage: list[bytes | str] = [
        b"not json", b"\xff\xfe", "null", "42", '"text"', "[]", "[1, 2]", "{}",
        '{"headers": null}', '{"headers": {}}', '{"headers": {"id": 7}}', "[{}]",
    ]  # fmt: skip
    redis_client.rpush(queue, *garbage)
    assert enqueue_training(celery, job_id=job_id, queue=queue)
    redis_client.rpush(queue, *garbage)
    tags = [f"test-{secrets.token_hex(8)}" for _ in garbage]
    unacked.extend(tags)
    for tag, entry in zip(tags, garbage, strict=True):
        deliver(redis_client, tag, entry)

    found = job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)

    assert job_id in found
    assert not found & {"7", "42", "1", "text", "None", ""}


@pytest.mark.parametrize("count", [4, 5])
def test_a_long_queue_is_read_page_by_page(
    celery: Celery,
    queue: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
) -> None:
    monkeypatch.setattr(queue_module, "SCAN_PAGE", 2)
    job_ids = {new_job_id() for _ in range(count)}
    for job_id in job_ids:
        assert enqueue_training(celery, job_id=job_id, queue=queue)
    assert job_ids <= job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)


def test_the_scan_reads_the_files_queue_too_so_a_waiting_validation_is_not_sent_twice(
    celery: Celery, queue: str, redis_client: redis.Redis
) -> None:
    files_queue = f"{queue}-files"
    file_id, job_id = new_file_id(), new_job_id()
    try:
        assert enqueue_validation(celery, file_id=file_id, queue=files_queue)
        assert enqueue_training(celery, job_id=job_id, queue=queue)
        assert redis_client.llen(files_queue) == 1 and redis_client.llen(queue) == 1
        found = job_ids_in_broker(redis_client, queue, files_queue, unacked_max_age=MAX_AGE)
        assert {file_id, job_id} <= found
        assert file_id not in job_ids_in_broker(redis_client, queue, unacked_max_age=MAX_AGE)
    finally:
        redis_client.delete(files_queue)


def test_validations_are_routed_to_the_files_queue(tmp_path: Path) -> None:
    from worker.celery_app import TRAIN_TASK, VALIDATE_TASK

    app = make_celery(
        Settings(home=tmp_path, redis_url=REDIS_URL, queue="gpu-x", files_queue="files-x")
    )
    try:
        assert app.conf.task_routes[VALIDATE_TASK] == {"queue": "files-x"}
        assert app.conf.task_routes[TRAIN_TASK] == {"queue": "gpu-x"}
    finally:
        app.close()
