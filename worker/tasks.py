"""Celery tasks. Thin: the work lives in worker.job_runner."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from app.settings import get_settings
from worker.celery_app import TRAIN_TASK


@shared_task(name=TRAIN_TASK, bind=True)
def train_job(self: Any, job_id: str) -> None:
    """Claim job `job_id`, train it, and record the outcome in the database."""
    from app.queue import enqueue_training
    from worker.job_runner import run_job  # torch loads in the child, never the parent

    settings = get_settings()
    run_job(
        job_id,
        settings,
        # The worker's node name: a shutting-down worker asks its own jobs to stop.
        worker=self.request.hostname or "unknown",
        enqueue=lambda job: enqueue_training(self.app, job_id=job, queue=settings.queue),
    )
