"""Sending a job to the workers, and finding which jobs the broker still holds.

The message carries the job id and nothing else; its task id starts with the job id,
so that the reaper can tell which queued jobs still have a message in Redis.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator

import redis
from celery import Celery

from worker.celery_app import TRAIN_TASK

logger = logging.getLogger(__name__)

# Where kombu's Redis transport keeps messages delivered to a worker but not yet acked.
UNACKED_KEY = "unacked"
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


def job_ids_in_broker(client: redis.Redis, queue: str) -> set[str]:
    """Jobs with a message waiting in `queue` or delivered and not yet acknowledged.

    Reads the whole queue: called only when some queued job is overdue, which is rare
    (a Redis restart, a publish that failed).
    """
    found: set[str] = set()
    for raw in _queue_messages(client, queue):
        task_id = _task_id(raw)
        if task_id:
            found.add(job_id_of_task(task_id))
    for _, raw in client.hscan_iter(UNACKED_KEY, count=SCAN_PAGE):
        task_id = _task_id(raw)
        if task_id:
            found.add(job_id_of_task(task_id))
    return found
