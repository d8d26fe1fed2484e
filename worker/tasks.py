"""Celery tasks. Thin: the work lives in worker.job_runner."""

from __future__ import annotations

from celery import shared_task

from app.settings import get_settings
from worker.celery_app import TRAIN_TASK


@shared_task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Claim job `job_id`, train it, and record the outcome in the database."""
    from worker.job_runner import run_job  # torch loads in the child, never the parent

    run_job(job_id, get_settings())
