"""Where checkpoint bytes live: chunked in the database (default) or in a directory.

The database store needs no shared disk between the API and workers on different
machines; the directory store (TRAINJOB_CHECKPOINT_DIR) suits a shared volume or a
mounted bucket and keeps large blobs out of the database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session, SessionTransaction

from app.checkpoints.models import Checkpoint, CheckpointChunk

CHUNK_BYTES = 4 * 1024 * 1024
PARTS = ("weights", "state")


class CheckpointStore(Protocol):
    name: str

    def write(self, session: Session, checkpoint: Checkpoint, part: str, data: bytes) -> None: ...

    def read(self, session: Session, checkpoint: Checkpoint, part: str) -> Iterator[bytes]: ...

    def delete(self, session: Session, checkpoint: Checkpoint) -> None: ...

    # For a checkpoint whose row this transaction deletes: its bytes go only if it commits.
    def discard(self, session: Session, checkpoint: Checkpoint) -> None: ...


class DatabaseStore:
    name = "database"

    def write(self, session: Session, checkpoint: Checkpoint, part: str, data: bytes) -> None:
        session.add_all(
            CheckpointChunk(
                checkpoint_id=checkpoint.id,
                part=part,
                seq=seq,
                data=data[start : start + CHUNK_BYTES],
            )
            for seq, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES))
        )
        session.flush()

    def read(self, session: Session, checkpoint: Checkpoint, part: str) -> Iterator[bytes]:
        # One chunk at a time: a large checkpoint never sits whole in memory.
        seqs = session.scalars(
            select(CheckpointChunk.seq)
            .where(CheckpointChunk.checkpoint_id == checkpoint.id, CheckpointChunk.part == part)
            .order_by(CheckpointChunk.seq)
        ).all()
        for seq in seqs:
            yield session.scalars(
                select(CheckpointChunk.data).where(
                    CheckpointChunk.checkpoint_id == checkpoint.id,
                    CheckpointChunk.part == part,
                    CheckpointChunk.seq == seq,
                )
            ).one()

    def delete(self, session: Session, checkpoint: Checkpoint) -> None:
        session.execute(
            delete(CheckpointChunk).where(CheckpointChunk.checkpoint_id == checkpoint.id)
        )

    def discard(self, session: Session, checkpoint: Checkpoint) -> None:
        self.delete(session, checkpoint)  # the chunks are rows: they go with the transaction


class DirectoryStore:
    name = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root

    def step_directory(self, checkpoint: Checkpoint) -> Path:
        return self.root / checkpoint.job_id / f"step-{checkpoint.step:07d}"

    def path(self, checkpoint: Checkpoint, part: str) -> Path:
        return self.step_directory(checkpoint) / f"{part}.bin"

    def write(self, session: Session, checkpoint: Checkpoint, part: str, data: bytes) -> None:
        target = self.path(checkpoint, part)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)  # readers never see half a file

    def read(self, session: Session, checkpoint: Checkpoint, part: str) -> Iterator[bytes]:
        with self.path(checkpoint, part).open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk

    def delete(self, session: Session, checkpoint: Checkpoint) -> None:
        _remove_step_directory(self.step_directory(checkpoint))

    def discard(self, session: Session, checkpoint: Checkpoint) -> None:
        # Files are not rolled back: deleted before a commit that then fails, they would
        # leave a row (perhaps the one a resume starts from) without its bytes.
        session.info.setdefault(_DISCARDED_DIRECTORIES, []).append(self.step_directory(checkpoint))


_DISCARDED_DIRECTORIES = "trainjob_discarded_checkpoint_directories"


def _remove_step_directory(directory: Path) -> None:
    for part in PARTS:
        (directory / f"{part}.bin").unlink(missing_ok=True)
        (directory / f"{part}.partial").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # already gone, or holding something not ours
        directory.rmdir()


@event.listens_for(Session, "after_commit")
def _remove_discarded_directories(session: Session) -> None:
    for directory in session.info.pop(_DISCARDED_DIRECTORIES, ()):
        _remove_step_directory(directory)


@event.listens_for(Session, "after_transaction_end")
def _keep_discarded_directories(session: Session, transaction: SessionTransaction) -> None:
    # A transaction that ends without a commit (rollback, close) deleted no rows.
    if transaction.parent is None:
        session.info.pop(_DISCARDED_DIRECTORIES, None)


def store_for(storage: str, checkpoint_dir: Path | None) -> CheckpointStore:
    if storage == "directory":
        if checkpoint_dir is None:
            raise RuntimeError(
                "checkpoint stored in a directory, but TRAINJOB_CHECKPOINT_DIR is unset"
            )
        return DirectoryStore(checkpoint_dir)
    return DatabaseStore()


def default_store(checkpoint_dir: Path | None) -> CheckpointStore:
    return DirectoryStore(checkpoint_dir) if checkpoint_dir is not None else DatabaseStore()
