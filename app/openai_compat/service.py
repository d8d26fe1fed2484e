"""The reads the OpenAI surface needs beyond the native routes': which jobs wait for their
files, events and checkpoints newest first (OpenAI's order), and what a fine-tuned
model's name downloads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.checkpoints import service as checkpoints_service
from app.checkpoints.models import Checkpoint
from app.db import page
from app.files.models import DataFile, JobFile
from app.jobs import service as jobs_service
from app.jobs.exceptions import JobNotFound
from app.jobs.models import JobEvent
from app.openai_compat import mapping
from app.openai_compat.exceptions import ModelNotFound


def waiting_for_files(session: Session, *, job_ids: Sequence[str]) -> set[str]:
    """Of `job_ids`, those training on a file that is still validating: one query."""
    if not job_ids:
        return set()
    query = (
        select(JobFile.job_id)
        .join(DataFile, DataFile.id == JobFile.file_id)
        .where(JobFile.job_id.in_(job_ids), DataFile.status == "validating")
    )
    return set(session.scalars(query))


def events_page(
    session: Session, *, job_id: str, tenant: str | None, before: int | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """The job's events newest first, from before the event id `before`."""
    jobs_service.get_job(session, job_id=job_id, tenant=tenant)
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
    if before is not None:
        query = query.where(JobEvent.id < before)
    return page(session, query, limit)


def checkpoints_page(
    session: Session, *, job_id: str, tenant: str | None, before_step: int | None, limit: int
) -> tuple[Any, list[Checkpoint], bool]:
    """The job, and its checkpoints newest first from before step `before_step`."""
    job = jobs_service.get_job(session, job_id=job_id, tenant=tenant)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
    if before_step is not None:
        query = query.where(Checkpoint.step < before_step)
    rows, has_more = page(session, query, limit)
    return job, rows, has_more


def weights_path(session: Session, *, name: str, tenant: str | None) -> str:
    """The native download (`/v1/jobs/{id}/weights`, with `?step=` for a checkpoint's
    name) of a fine-tuned model name; ModelNotFound unless the name is exactly one of
    the tenant's jobs' (a succeeded one's, or one of its checkpoints')."""
    try:
        job_id, step = mapping.parse_model_name(name)
        job = jobs_service.get_job(session, job_id=job_id, tenant=tenant)
    except (ValueError, JobNotFound):
        raise ModelNotFound(name, "not the name of a fine-tuned model of yours") from None
    base = mapping.fine_tuned_model_name(spec=job.spec, tenant=job.tenant, job_id=job.id)
    if step is None:
        if name != base:
            raise ModelNotFound(name, f"job {job.id}'s model is named {base!r}")
        if job.status != "succeeded":
            raise ModelNotFound(name, f"job {job.id} is {job.status}, not succeeded")
        return f"/v1/jobs/{job.id}/weights"
    if name != mapping.checkpoint_model_name(base, step):
        raise ModelNotFound(name, f"job {job.id}'s checkpoints are named {base!r}:ckpt-step-N")
    checkpoints_service.find_checkpoint(session, job_id=job.id, step=step, tenant=tenant)
    return f"/v1/jobs/{job.id}/weights?step={step}"
