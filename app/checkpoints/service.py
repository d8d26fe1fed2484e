"""Checkpoints of a job: save (fenced by the worker's lease) and prune, list, find, read."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.blobs import Blob, BlobStore, BlobWriter, DatabaseStore, store_for
from app.checkpoints import retention
from app.checkpoints.exceptions import NoCheckpoint
from app.checkpoints.models import Checkpoint, CheckpointChunk
from app.db import utcnow
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.runs import Claim, LeaseLost, append_events
from app.jobs.spec import KeepCheckpointsSpec

logger = logging.getLogger(__name__)

PARTS = ("weights", "state")

# A part's bytes, or a function that writes them into the store as it serialises them:
# the worker's way, so that a save holds no copy of the weights or the optimizer state.
PartSource = bytes | Callable[[BlobWriter], object]


def save_checkpoint(
    session: Session,
    *,
    claim: Claim,
    store: BlobStore,
    step: int,
    weights: PartSource,
    state: PartSource,
    loss: float | None,
    eval_loss: float | None = None,
) -> Checkpoint:
    """Store a checkpoint's bytes and metadata, if the job is still this worker's, then
    delete those that the job's `keep_checkpoints` no longer keeps."""
    job = session.execute(
        update(Job).where(runs.owned(claim)).values(heartbeat_at=utcnow()).returning(Job.spec)
    ).first()
    if job is None:
        raise LeaseLost(claim.job_id)
    existing = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == claim.job_id, Checkpoint.step == step)
    ).first()
    if existing is not None:  # an earlier attempt got this far: same step, same bytes
        (_store_holding(existing, store) or store).delete(session, *_blobs(existing))
        session.delete(existing)
        session.flush()
    # JSON has no NaN or infinity (an fp16 overflow has both): store them as unknown.
    loss, eval_loss = retention.finite_or_none(loss), retention.finite_or_none(eval_loss)
    checkpoint = Checkpoint(
        job_id=claim.job_id,
        step=step,
        size_bytes=0,  # known once written, below
        weights_bytes=0,
        loss=loss,
        eval_loss=eval_loss,
        storage=store.name,
    )
    session.add(checkpoint)
    session.flush()
    weights_bytes = _write_part(session, store, checkpoint, "weights", weights)
    size = weights_bytes + _write_part(session, store, checkpoint, "state", state)
    checkpoint.weights_bytes, checkpoint.size_bytes = weights_bytes, size
    append_events(
        session,
        claim.job_id,
        [("checkpoint", {"step": step, "size_bytes": size, "loss": loss, "eval_loss": eval_loss})],
    )
    if (keep := job.spec.get("keep_checkpoints")) is not None:
        policy = KeepCheckpointsSpec.model_validate(keep)
        prune_checkpoints(session, job_id=claim.job_id, policy=policy, store=store)
    return checkpoint


def prune_checkpoints(
    session: Session, *, job_id: str, policy: KeepCheckpointsSpec, store: BlobStore
) -> None:
    """Delete the job's checkpoints that `policy` does not keep.

    Bytes go from the store each was written to; in a directory, once the transaction
    commits. `store` is the worker's: the one that knows the directory."""
    # All of a job's rows, but few: this runs at every save, so at most last + best + 1.
    rows = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
    ).all()
    candidates = [retention.Candidate(row.step, row.loss, row.eval_loss) for row in rows]
    kept = retention.steps_to_keep(candidates, last=policy.last, best=policy.best)
    for row in [row for row in rows if row.step not in kept]:
        if (holder := _store_holding(row, store)) is None:
            logger.warning(
                "job %s: checkpoint at step %d is in a %s store this worker cannot reach; kept",
                job_id,
                row.step,
                row.storage,
            )
        else:
            holder.discard(session, *_blobs(row))
            session.delete(row)
    session.flush()


def _write_part(
    session: Session, store: BlobStore, checkpoint: Checkpoint, part: str, source: PartSource
) -> int:
    writer = store.writer(session, part_blob(checkpoint, part))
    if isinstance(source, bytes):
        writer.write(source)
    else:
        source(writer)
    return writer.finish()


def part_blob(checkpoint: Checkpoint, part: str) -> Blob:
    """A part's chunk rows, or its file: `<root>/<job_id>/step-0000123/<part>.bin`."""
    path = f"{checkpoint.job_id}/step-{checkpoint.step:07d}/{part}.bin"
    return Blob(CheckpointChunk, {"checkpoint_id": checkpoint.id, "part": part}, path)


def _blobs(checkpoint: Checkpoint) -> list[Blob]:
    return [part_blob(checkpoint, part) for part in PARTS]


def _store_holding(checkpoint: Checkpoint, store: BlobStore) -> BlobStore | None:
    """The store with the checkpoint's bytes: `store`, or the database; None when they are
    in a directory `store` does not know (the checkpoint directory setting was changed)."""
    if checkpoint.storage == store.name:
        return store
    if checkpoint.storage == DatabaseStore.name:
        return DatabaseStore()
    return None


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
    unset = "checkpoint stored in a directory, but TRAINJOB_CHECKPOINT_DIR is unset"
    store = store_for(checkpoint.storage, checkpoint_dir, unset=unset)
    return store.read(session, part_blob(checkpoint, part))
