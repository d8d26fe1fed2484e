"""Sending a job (or a file's validation) to the workers, and finding which the broker
still holds.

The message carries the job id (the file id) and nothing else; its task id starts with
that id, so that the reaper can tell which queued jobs and validating files still have
a message in Redis.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery

from worker.celery_app import TRAIN_TASK, VALIDATE_TASK

logger = logging.getLogger(__name__)

# Where kombu's Redis transport keeps messages delivered to a worker but not yet acked,
# and when each was delivered (a sorted set of delivery tags scored by time).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
SCAN_PAGE = 1000


def task_id_for(job_id: str) -> str:
    return f"{job_id}:{secrets.token_hex(4)}"


def job_id_of_task(task_id: str) -> str:
    return task_id.split(":", 1)[0]


def enqueue_training(celery: Celery, *, job_id: str, queue: str) -> bool:
    """Publish the training task; False (logged) when the broker cannot be reached."""
    try:
        celery.send_task(TRAIN_TASK, args=[job_id], queue=queue, task_id=task_id_for(job_id))
    except Exception:  # the row is committed; the reaper sends it again later
        logger.exception("could not enqueue job %s", job_id)
        return False
    return True


def enqueue_validation(celery: Celery, *, file_id: str, queue: str) -> bool:
    """Publish the validation of an uploaded file; False (logged) when the broker cannot be
    reached (the file stays `validating` and the reaper sends it again later)."""
    try:
        celery.send_task(VALIDATE_TASK, args=[file_id], queue=queue, task_id=task_id_for(file_id))
    except Exception:
        logger.exception("could not enqueue the validation of file %s", file_id)
        return False
    return True


def _task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacked entry: [message, exchange, routing key]
            message = message[0]
        task_id = message["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return task_id if isinstance(task_id, str) else None


def _queue_messages(client: redis.Redis, queue: str) -> Iterator[bytes | str]:
    start = 0
    while True:
        page = client.lrange(queue, start, start + SCAN_PAGE - 1)
        yield from page
        if len(page) < SCAN_PAGE:
            return
        start += SCAN_PAGE


def job_ids_in_broker(client: redis.Redis, *queues: str, unacked_max_age: float) -> set[str]:
    """Jobs (and files to validate) with a message waiting in one of `queues`, or
    delivered less than `unacked_max_age` seconds ago and not yet acknowledged.

    An older delivery of a job that is still queued belongs to a worker that died
    before it could claim the job: kombu would give that message back only after the
    visibility timeout (days), so it does not count. Reads the whole queue: called
    only when some queued job is overdue, which is rare (a Redis restart, a lost
    worker, a publish that failed).
    """
    found: set[str] = set()
    for queue in queues:
        for raw in _queue_messages(client, queue):
            task_id = _task_id(raw)
            if task_id:
                found.add(job_id_of_task(task_id))
    since = time.time() - unacked_max_age
    tags: list[Any] = list(client.zrangebyscore(UNACKED_INDEX_KEY, since, "+inf"))
    for start in range(0, len(tags), SCAN_PAGE):
        entries: list[Any] = client.hmget(UNACKED_KEY, tags[start : start + SCAN_PAGE])
        for entry in entries:
            task_id = _task_id(entry) if entry is not None else None
            if task_id:
                found.add(job_id_of_task(task_id))
    return found
