"""Checkpoints of a job: save (fenced by the worker's lease) and prune, list, find, read."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.blobs import Blob, BlobStore, BlobWriter, DatabaseStore, store_for
from app.checkpoints import adapters, retention
from app.checkpoints.exceptions import NoAdapter, NoCheckpoint, NoMergedWeights
from app.checkpoints.models import Checkpoint, CheckpointChunk
from app.db import utcnow
from app.errors import InvalidRequest
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.runs import Claim, LeaseLost, append_events
from app.jobs.spec import KeepCheckpointsSpec

logger = logging.getLogger(__name__)

# "merged": a LoRA job's final checkpoint only, the base with the adapters merged in.
PARTS = ("weights", "state", "merged")

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
    merged: PartSource | None = None,
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
    if merged is not None:
        size += _write_part(session, store, checkpoint, "merged", merged)
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
    return _store_of(checkpoint, checkpoint_dir).read(session, part_blob(checkpoint, part))


def part_size(
    session: Session, *, checkpoint: Checkpoint, part: str, checkpoint_dir: Path | None
) -> int | None:
    """A part's size in bytes; None when the checkpoint has no such part (only a LoRA
    job's final checkpoint has "merged")."""
    return _store_of(checkpoint, checkpoint_dir).size(session, part_blob(checkpoint, part))


def _store_of(checkpoint: Checkpoint, checkpoint_dir: Path | None) -> BlobStore:
    unset = "checkpoint stored in a directory, but TRAINJOB_CHECKPOINT_DIR is unset"
    return store_for(checkpoint.storage, checkpoint_dir, unset=unset)


WeightsFormat = Literal["peft", "safetensors"]


@dataclass(frozen=True)
class WeightsDownload:
    """What `GET /v1/jobs/{id}/weights` sends: a checkpoint's part of `size` bytes, alone
    or, with `adapter_config`, as a LoRA adapter in peft's layout (a zip)."""

    checkpoint: Checkpoint
    part: str
    size: int
    adapter_config: bytes | None = None

    @property
    def filename(self) -> str:
        stem = f"{self.checkpoint.job_id}-step-{self.checkpoint.step}"
        if self.adapter_config is not None:
            return f"{stem}-adapter.zip"
        suffix = {"merged": "-merged", "weights": ""}[self.part]
        return f"{stem}{suffix}.safetensors"

    @property
    def body_size(self) -> int:
        if self.adapter_config is None:
            return self.size
        return adapters.zip_size(
            [
                (adapters.ADAPTER_WEIGHTS_NAME, self.size),
                (adapters.ADAPTER_CONFIG_NAME, len(self.adapter_config)),
            ]
        )


def weights_download(
    session: Session,
    *,
    job_id: str,
    step: int | None,
    tenant: str | None,
    format: WeightsFormat | None,
    merged: bool,
    checkpoint_dir: Path | None,
) -> WeightsDownload:
    """Which weights a download sends. A job without LoRA: its weights (they are whole:
    `merged` changes nothing; `format` "peft" is refused). A LoRA job: the adapter, as a
    peft zip (the default, "peft") or its safetensors alone ("safetensors"); `merged`:
    the base with the adapter merged in, which only the final checkpoint has."""
    if merged and format == "peft":
        message = "merged weights are safetensors: leave format out, or use safetensors"
        raise InvalidRequest(message, fields=[{"path": "format", "message": message}])
    job = jobs_service.get_job(session, job_id=job_id, tenant=tenant)
    lora = job.spec.get("lora") is not None
    if not lora and format == "peft":
        raise NoAdapter(
            f"job {job_id} trains no LoRA adapter (its spec has no lora), so it has no peft "
            "adapter to download: leave format out for its weights",
            job_id=job_id,
        )
    checkpoint = find_checkpoint(session, job_id=job_id, step=step, tenant=tenant)
    if not lora:
        return WeightsDownload(checkpoint, "weights", checkpoint.weights_bytes)
    if merged:
        size = part_size(
            session, checkpoint=checkpoint, part="merged", checkpoint_dir=checkpoint_dir
        )
        if size is None:
            raise NoMergedWeights(
                f"the checkpoint at step {checkpoint.step} of job {job_id} has no merged "
                "weights: merged weights are written with a LoRA job's final checkpoint",
                job_id=job_id,
                step=checkpoint.step,
            )
        return WeightsDownload(checkpoint, "merged", size)
    if format == "safetensors":
        return WeightsDownload(checkpoint, "weights", checkpoint.weights_bytes)
    if checkpoint.weights_bytes > adapters.MAX_MEMBER_BYTES:
        message = (
            f"the adapter has {checkpoint.weights_bytes:,} bytes, more than a plain zip holds "
            "here: download it with format=safetensors (its metadata holds the adapter config)"
        )
        raise InvalidRequest(message, fields=[{"path": "format", "message": message}])
    part = read_part(session, checkpoint=checkpoint, part="weights", checkpoint_dir=checkpoint_dir)
    # Only the header's chunks are read; the rest of the part is left unread.
    metadata = adapters.safetensors_metadata(part)
    return WeightsDownload(
        checkpoint, "weights", checkpoint.weights_bytes, adapters.adapter_config(metadata)
    )
