"""Runs one job for the Celery task: claim, train, record the outcome.

Imported inside the task only, so the worker's parent process never loads torch
(and never initialises CUDA before forking its children).
"""

from __future__ import annotations

import logging
import socket

from app.checkpoints import service as checkpoints_service
from app.checkpoints.store import default_store
from app.db import Database
from app.errors import NotFound
from app.jobs.models import Job
from app.jobs.runs import Claim, LeaseLost, claim_job, finish_job
from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.engine.checkpoint import Checkpoint
from worker.engine.errors import TrainingError
from worker.engine.trainer import Callbacks, train
from worker.live import LivePublisher
from worker.progress_writer import ProgressWriter

logger = logging.getLogger(__name__)


def worker_name() -> str:
    return socket.gethostname()


def latest_checkpoint(database: Database, settings: Settings, job_id: str) -> Checkpoint | None:
    """The newest stored checkpoint of the job, to resume from; None for a fresh start."""
    with database.session() as session:
        try:
            stored = checkpoints_service.find_checkpoint(session, job_id=job_id)
        except NotFound:
            return None
        parts = {
            part: b"".join(
                checkpoints_service.read_part(
                    session, checkpoint=stored, part=part, checkpoint_dir=settings.checkpoint_dir
                )
            )
            for part in ("weights", "state")
        }
    return Checkpoint(
        step=stored.step, weights=parts["weights"], state=parts["state"], loss=stored.loss
    )


def run_job(job_id: str, settings: Settings) -> None:
    database = Database(settings.effective_database_url)
    publisher = LivePublisher(settings.redis_url)
    try:
        with database.session() as session:
            claim = claim_job(session, job_id=job_id, worker=worker_name())
            session.commit()
            job = session.get(Job, job_id) if claim else None
        if claim is None or job is None:
            logger.info("job %s is not queued (a duplicate delivery or a cancel): skipped", job_id)
            return
        publisher.publish(job_id, [{"type": "status", "data": {"status": "running"}}])
        _train_claimed(database, settings, publisher, claim, JobSpec.model_validate(job.spec))
    finally:
        publisher.close()
        database.dispose()


def _train_claimed(
    database: Database,
    settings: Settings,
    publisher: LivePublisher,
    claim: Claim,
    spec: JobSpec,
) -> None:
    writer = ProgressWriter(
        database,
        claim,
        default_store(settings.checkpoint_dir),
        publisher,
        settings.progress_flush_seconds,
    )
    callbacks = Callbacks(
        on_start=writer.on_start,
        on_step=writer.on_step,
        on_event=writer.on_event,
        on_checkpoint=writer.on_checkpoint,
        should_stop=writer.should_stop,
    )
    status, error = "succeeded", None
    try:
        result = train(spec, callbacks, resume=latest_checkpoint(database, settings, claim.job_id))
        if result.status == "stopped":
            status = "cancelled"
    except LeaseLost:
        logger.warning(
            "job %s: lease lost to another worker; stopping without writing", claim.job_id
        )
        return
    except TrainingError as failure:
        status, error = "failed", (failure.type, failure.message)
    except Exception as failure:
        logger.exception("job %s failed", claim.job_id)
        status, error = "failed", ("internal_error", f"{type(failure).__name__}: {failure}")
    try:
        writer.flush()
        with database.session() as session:
            finish_job(session, claim=claim, status=status, error=error)
            session.commit()
    except LeaseLost:
        logger.warning("job %s: lease lost before recording %s", claim.job_id, status)
        return
    data = {"status": status} | (
        {"error": {"type": error[0], "message": error[1]}} if error else {}
    )
    publisher.publish(claim.job_id, [{"type": "status", "data": data}])
