"""Celery tasks. Thin: the work lives in worker.job_runner and worker.datafiles.runner."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import current_app, shared_task
from celery.signals import worker_process_init

from app.queue import TRAIN_TASK, VALIDATE_TASK, training_sender
from app.settings import get_settings

logger = logging.getLogger(__name__)


@worker_process_init.connect
def preload_the_engine(**_: Any) -> None:
    """Import torch and the engine in each pool child as it starts, while it waits for a
    job: otherwise a job's first second or two goes on these imports before its claim.
    Celery sends this signal in pool children only: the parent never imports torch.
    A worker that does not consume the training queue (a files worker) skips it: a
    validation needs numpy only."""
    if get_settings().queue not in current_app.amqp.queues.consume_from:
        return
    began = time.monotonic()
    try:
        import worker.job_runner  # noqa: F401
    except Exception:  # logged here; the task's own import then raises it for the job
        logger.exception("preloading the engine failed")
        return
    logger.info("preloaded the engine in %.2f s", time.monotonic() - began)


@shared_task(name=TRAIN_TASK, bind=True)
def train_job(self: Any, job_id: str) -> None:
    """Claim job `job_id`, train it, and record the outcome in the database."""
    from worker.job_runner import run_job  # preloaded in the child; never the parent

    settings = get_settings()
    run_job(
        job_id,
        settings,
        # The worker's node name: a shutting-down worker asks its own jobs to stop.
        worker=self.request.hostname or "unknown",
        enqueue=training_sender(self.app, settings.queue),
    )


@shared_task(name=VALIDATE_TASK, bind=True)
def validate_file(self: Any, file_id: str) -> None:
    """Check uploaded file `file_id`, record `valid` or `invalid`, and send the jobs that
    were waiting for it."""
    from worker.datafiles.runner import validate_stored_file

    settings = get_settings()
    validate_stored_file(file_id, settings, enqueue=training_sender(self.app, settings.queue))
