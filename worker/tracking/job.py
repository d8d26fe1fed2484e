"""Tracking for a claimed job: its tracker built from the spec and the settings, its
warning handed to the job's events, its final weights and its end.

Only rank 0 of a job tracks (it is the process that reports progress: worker/rank.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.checkpoints import adapters
from app.checkpoints import service as checkpoints_service
from app.db import Database
from app.jobs.models import Job
from app.jobs.runs import Claim
from app.jobs.spec import JobSpec
from app.settings import Settings
from worker.engine.trainer import StepMetrics
from worker.progress_writer import ProgressWriter
from worker.tracking.mlflow_backend import JOB_ID_TAG, TENANT_TAG, MlflowBackend
from worker.tracking.params import spec_params
from worker.tracking.tracker import Backend, RunTracker

# How a run ended (the job's outcome status) as an MLflow run status. A job handed back
# (preempted, paused, its worker stopped) is SCHEDULED: it resumes in the same run.
RUN_STATUSES = {
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
    "queued": "SCHEDULED",
}
WEIGHTS_FILE = "model.safetensors"

OnEvent = Callable[[str, dict[str, Any]], None]

logger = logging.getLogger(__name__)


def start_tracking(
    database: Database, settings: Settings, claim: Claim, spec: JobSpec
) -> RunTracker | None:
    """The started tracker of a job whose spec asks for tracking; None for the others."""
    if spec.tracking is None:
        return None
    uri = settings.mlflow_tracking_uri
    tags = {JOB_ID_TAG: claim.job_id}
    try:
        with database.session() as session:
            tenant = session.scalar(select(Job.tenant).where(Job.id == claim.job_id))
    except SQLAlchemyError:  # a tag is not worth failing the job for: the run goes without
        logger.warning("job %s: its tenant could not be read for its tracking", claim.job_id)
        tenant = None
    if tenant is not None:
        tags[TENANT_TAG] = tenant
    tracker = RunTracker(
        connect=lambda: _connect(uri),
        experiment=spec.tracking.mlflow.experiment,
        run_name=spec.tracking.mlflow.run_name or spec.name or claim.job_id,
        tags=tags,
        params=spec_params(spec.model_dump(mode="json")),
        flush_seconds=settings.progress_flush_seconds,
        secrets=_secrets_of(uri),
    )
    tracker.start()
    return tracker


def _connect(uri: str | None) -> Backend:
    if uri is None:
        # The API refuses such a job when it lacks the setting; this worker lacks it.
        raise RuntimeError("TRAINJOB_MLFLOW_TRACKING_URI is unset on this worker")
    try:
        return MlflowBackend(uri)
    except ImportError as error:
        raise RuntimeError(
            f"MLflow is not installed on this worker (pip install 'trainjob[mlflow]'): {error}"
        ) from error


def _secrets_of(uri: str | None) -> tuple[str, ...]:
    """What a warning must not show of the tracking URI: all of it, and its user and
    password (an MLflow error may print the host it could not reach)."""
    if uri is None:
        return ()
    parts = urlsplit(uri)
    return (uri, parts.netloc) if parts.password or parts.username else (uri,)


def tracked_on_step(
    on_step: Callable[[StepMetrics], None], on_event: OnEvent, tracker: RunTracker
) -> Callable[[StepMetrics], None]:
    """`on_step` that also queues the step for the tracker and records the tracker's one
    warning as a job event (from the job's own thread: the progress writer is not
    thread-safe)."""

    def both(metrics: StepMetrics) -> None:
        on_step(metrics)
        tracker.on_step(metrics)
        pass_on_warning(tracker, on_event)

    return both


def pass_on_warning(tracker: RunTracker, on_event: OnEvent) -> None:
    warning = tracker.take_warning()
    if warning is not None:
        on_event("warning", {"message": warning})


def end_tracking(
    tracker: RunTracker,
    outcome_status: str | None,
    database: Database,
    settings: Settings,
    spec: JobSpec,
    writer: ProgressWriter,
) -> None:
    """Set the run's status for the job's outcome, uploading the final checkpoint's
    weights when it succeeded; None: the job is another run's now, left alone. A warning
    from the end goes with the job's events (never failing the job)."""
    job_id = writer.claim.job_id
    status = RUN_STATUSES.get(outcome_status) if outcome_status is not None else None
    weights = None
    if status == "FINISHED" and tracker.active:
        weights = Path(tempfile.mkdtemp(prefix="trainjob-tracking-"))
        try:
            write_final_weights(database, settings, job_id, weights, lora=spec.lora is not None)
        except Exception as error:  # the job succeeded: its tracking only goes without them
            shutil.rmtree(weights, ignore_errors=True)
            weights = None
            tracker.stop(f"could not read the final weights: {type(error).__name__}: {error}")
    tracker.end(status, weights)
    if outcome_status is None:
        return
    pass_on_warning(tracker, writer.on_event)
    if writer.pending_events:
        try:
            writer.flush(required=False)
        except Exception:
            logger.warning("job %s: the tracking warning could not be written", job_id)


def write_final_weights(
    database: Database, settings: Settings, job_id: str, directory: Path, *, lora: bool
) -> None:
    """The job's latest checkpoint's weights into `directory`, streamed from the store:
    `model.safetensors`, or for a LoRA job its adapter as peft saves it
    (`adapter_model.safetensors` and `adapter_config.json`)."""
    path = directory / (adapters.ADAPTER_WEIGHTS_NAME if lora else WEIGHTS_FILE)
    with database.session() as session, path.open("wb") as output:
        checkpoint = checkpoints_service.find_checkpoint(session, job_id=job_id)
        for chunk in checkpoints_service.read_part(
            session, checkpoint=checkpoint, part="weights", checkpoint_dir=settings.checkpoint_dir
        ):
            output.write(chunk)
    if lora:
        with path.open("rb") as weights:
            metadata = adapters.safetensors_metadata(iter(lambda: weights.read(1 << 16), b""))
        config = adapters.adapter_config(metadata)
        (directory / adapters.ADAPTER_CONFIG_NAME).write_bytes(config)
