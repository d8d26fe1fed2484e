"""Sending a job (or a file's validation) to the workers.

The message carries the job id (the file id) and nothing else. A message can be lost (a
failed publish, a Redis restart, a worker killed between taking it and claiming the job)
or arrive twice; the jobs table decides: the reaper sends again what has waited too long
(app/jobs/reaper.py), and the claim refuses a job that is no longer queued, so a
duplicate does nothing.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from celery import Celery

logger = logging.getLogger(__name__)

# The tasks' names, which the worker registers (worker/tasks.py).
TRAIN_TASK = "trainjob.train_job"
VALIDATE_TASK = "trainjob.validate_file"


def _send(celery: Celery, task: str, item_id: str, queue: str) -> bool:
    try:
        # The task id starts with the job (file) id: a worker's log line or a message
        # seen in Redis says what it is for.
        task_id = f"{item_id}:{secrets.token_hex(4)}"
        celery.send_task(task, args=[item_id], queue=queue, task_id=task_id)
    except Exception:  # the row is committed; the reaper sends it again later
        logger.exception("could not send %s %s", task, item_id)
        return False
    return True


def enqueue_training(celery: Celery, *, job_id: str, queue: str) -> bool:
    """Publish the training task; False (logged) when the broker cannot be reached."""
    return _send(celery, TRAIN_TASK, job_id, queue)


def enqueue_validation(celery: Celery, *, file_id: str, queue: str) -> bool:
    """Publish the validation of an uploaded file; False (logged) when the broker cannot be
    reached (the file stays `validating` and the reaper sends it again later)."""
    return _send(celery, VALIDATE_TASK, file_id, queue)


def training_queue(queue: str, devices: int) -> str:
    """The queue of jobs on `devices` devices: a worker consumes those of as many devices
    as it has (cli/serve.py), so that none takes a job it cannot run. One-device jobs keep
    the plain name."""
    return queue if devices == 1 else f"{queue}.devices-{devices}"


# Sends a job (its id, its devices) to the workers; False when the broker did not take it.
Sender = Callable[[str, int], bool]


def training_sender(celery: Celery, queue: str) -> Sender:
    """`enqueue_training` to the job's queue, as the code that sends jobs takes it."""
    return lambda job_id, devices: enqueue_training(
        celery, job_id=job_id, queue=training_queue(queue, devices)
    )
