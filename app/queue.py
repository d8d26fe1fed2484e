"""Sending a job to the workers: the message carries the job id and nothing else."""

from __future__ import annotations

import logging

from celery import Celery

from worker.celery_app import TRAIN_TASK

logger = logging.getLogger(__name__)


def enqueue_training(celery: Celery, *, job_id: str, queue: str) -> bool:
    """Publish the training task; False (logged) when the broker cannot be reached."""
    try:
        celery.send_task(TRAIN_TASK, args=[job_id], queue=queue)
    except Exception:  # the row is committed; the job stays queued rather than lost
        logger.exception("could not enqueue job %s", job_id)
        return False
    return True
