"""Checkpoints of a job: save (fenced by the worker's lease), list, find, read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.checkpoints.models import Checkpoint
from app.checkpoints.store import CheckpointStore, store_for
from app.db import page, utcnow
from app.errors import NotFound
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES, Claim, LeaseLost, append_events


class NoCheckpoint(NotFound):
    type = "no_checkpoint"


def save_checkpoint(
    session: Session,
    *,
    claim: Claim,
    store: CheckpointStore,
    step: int,
    weights: bytes,
    state: bytes,
    loss: float | None,
) -> Checkpoint:
    """Store a checkpoint's bytes and metadata, if the job is still this worker's."""
    owned = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.lease == claim.lease, Job.status.in_(LIVE_STATUSES))
        .values(heartbeat_at=utcnow())
        .returning(Job.id)
    ).first()
    if owned is None:
        raise LeaseLost(claim.job_id)
    existing = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == claim.job_id, Checkpoint.step == step)
    ).first()
    if existing is not None:  # an earlier attempt got this far: same step, same bytes
        store.delete(session, existing)
        session.delete(existing)
        session.flush()
    checkpoint = Checkpoint(
        job_id=claim.job_id,
        step=step,
        size_bytes=len(weights) + len(state),
        weights_bytes=len(weights),
        loss=loss,
        storage=store.name,
        created_at=utcnow(),
    )
    session.add(checkpoint)
    session.flush()
    store.write(session, checkpoint, "weights", weights)
    store.write(session, checkpoint, "state", state)
    append_events(
        session,
        claim.job_id,
        [("checkpoint", {"step": step, "size_bytes": checkpoint.size_bytes, "loss": loss})],
    )
    return checkpoint


def list_checkpoints(
    session: Session,
    *,
    job_id: str,
    after_step: int | None,
    limit: int,
    tenant: str | None = None,
) -> tuple[list[Checkpoint], bool]:
    """A job's checkpoints in step order."""
    jobs_service.get_job(session, job_id=job_id, tenant=tenant)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
    if after_step is not None:
        query = query.where(Checkpoint.step > after_step)
    return page(session, query, limit)


def find_checkpoint(
    session: Session, *, job_id: str, step: int | None = None, tenant: str | None = None
) -> Checkpoint:
    """The checkpoint at `step`, or the latest one; NoCheckpoint when there is none."""
    jobs_service.get_job(session, job_id=job_id, tenant=tenant)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if step is not None:
        query = query.where(Checkpoint.step == step)
    checkpoint = session.scalars(query.order_by(Checkpoint.step.desc()).limit(1)).first()
    if checkpoint is None:
        where = f" at step {step}" if step is not None else ""
        raise NoCheckpoint(f"job {job_id} has no checkpoint{where}", job_id=job_id)
    return checkpoint


def read_part(
    session: Session, *, checkpoint: Checkpoint, part: str, checkpoint_dir: Path | None
) -> Iterator[bytes]:
    return store_for(checkpoint.storage, checkpoint_dir).read(session, checkpoint, part)
