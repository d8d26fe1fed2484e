"""Where checkpoint bytes live: chunked in the database (default) or in a directory.

The database store needs no shared disk between the API and workers on different
machines; the directory store (TRAINJOB_CHECKPOINT_DIR) suits a shared volume or a
mounted bucket and keeps large blobs out of the database.

A part is written through a `PartWriter` as the worker serialises it, a chunk at a
time, so that a save never holds the weights or the optimizer state as one more copy
in memory (app/files/store.py streams uploads the same way).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from app.checkpoints.models import Checkpoint, CheckpointChunk
from app.db import after_commit, read_by_seq

CHUNK_BYTES = 4 * 1024 * 1024
PARTS = ("weights", "state")


class PartWriter(Protocol):
    """A file-like sink for one part (torch.save writes into it): bytes in any sizes."""

    def write(self, data: bytes | memoryview, /) -> int: ...

    def flush(self) -> None: ...

    def finish(self) -> int:
        """Make the bytes written the part's content (the row commits after); their size."""


class CheckpointStore(Protocol):
    name: str

    def writer(self, session: Session, checkpoint: Checkpoint, part: str) -> PartWriter: ...

    def read(self, session: Session, checkpoint: Checkpoint, part: str) -> Iterator[bytes]: ...

    def delete(self, session: Session, checkpoint: Checkpoint) -> None: ...

    # For a checkpoint whose row this transaction deletes: its bytes go only if it commits.
    def discard(self, session: Session, checkpoint: Checkpoint) -> None: ...


class DatabaseChunkWriter:
    """Cuts what it is given into CHUNK_BYTES rows, inserted as each one fills."""

    def __init__(self, session: Session, checkpoint_id: int, part: str) -> None:
        self.session = session
        self.checkpoint_id = checkpoint_id
        self.part = part
        self.pending = bytearray()
        self.seq = 0
        self.size = 0

    def write(self, data: bytes | memoryview, /) -> int:
        view = memoryview(data).cast("B")  # slices of a view copy nothing
        size = len(view)
        while view:
            room = CHUNK_BYTES - len(self.pending)
            self.pending += view[:room]
            view = view[room:]
            if len(self.pending) == CHUNK_BYTES:
                self._insert(bytes(self.pending))
                self.pending.clear()
        self.size += size
        return size

    def flush(self) -> None:
        pass  # a partial chunk waits for more bytes or for finish()

    def finish(self) -> int:
        if self.pending or self.seq == 0:  # an empty part is one empty chunk
            self._insert(bytes(self.pending))
            self.pending.clear()
        return self.size

    def _insert(self, chunk: bytes) -> None:
        # A Core insert: no ORM object keeps the chunk alive once it has been sent.
        row = {"checkpoint_id": self.checkpoint_id, "part": self.part, "seq": self.seq}
        self.session.execute(insert(CheckpointChunk), {**row, "data": chunk})
        self.seq += 1


class DatabaseStore:
    name = "database"

    def writer(self, session: Session, checkpoint: Checkpoint, part: str) -> PartWriter:
        return DatabaseChunkWriter(session, checkpoint.id, part)

    def read(self, session: Session, checkpoint: Checkpoint, part: str) -> Iterator[bytes]:
        return read_by_seq(
            session,
            CheckpointChunk.data,
            CheckpointChunk.seq,
            CheckpointChunk.checkpoint_id == checkpoint.id,
            CheckpointChunk.part == part,
        )

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

    def writer(self, session: Session, checkpoint: Checkpoint, part: str) -> PartWriter:
        return DirectoryPartWriter(self.path(checkpoint, part))

    def read(self, session: Session, checkpoint: Checkpoint, part: str) -> Iterator[bytes]:
        return read_chunks(self.path(checkpoint, part))

    def delete(self, session: Session, checkpoint: Checkpoint) -> None:
        _remove_step_directory(self.step_directory(checkpoint))

    def discard(self, session: Session, checkpoint: Checkpoint) -> None:
        # Perhaps the row a resume starts from: its bytes must outlive a failed commit.
        after_commit(session, partial(_remove_step_directory, self.step_directory(checkpoint)))


class DirectoryPartWriter:
    """Writes `<part>.partial`, then makes it `<part>.bin` durably: the row that says the
    checkpoint exists commits after this, so its bytes must survive a power cut first."""

    def __init__(self, target: Path) -> None:
        _make_directories(target.parent)
        self.target = target
        self.partial = target.with_suffix(".partial")
        self.handle: BinaryIO = self.partial.open("wb")
        self.size = 0

    def write(self, data: bytes | memoryview, /) -> int:
        written = self.handle.write(data)
        self.size += written
        return written

    def flush(self) -> None:
        self.handle.flush()

    def finish(self) -> int:
        with self.handle:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.partial.replace(self.target)  # readers never see half a file
        _fsync_directory(self.target.parent)  # the rename itself
        return self.size


def _make_directories(directory: Path) -> None:
    """mkdir -p, and fsync the parent of each directory it creates, so that the new
    entries are as durable as the files that will be fsynced inside them."""
    if directory.is_dir():
        return
    _make_directories(directory.parent)
    with contextlib.suppress(FileExistsError):  # another worker made it meanwhile
        directory.mkdir()
    _fsync_directory(directory.parent)


def read_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes, CHUNK_BYTES at a time."""
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_step_directory(directory: Path) -> None:
    for part in PARTS:
        (directory / f"{part}.bin").unlink(missing_ok=True)
        (directory / f"{part}.partial").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # already gone, or holding something not ours
        directory.rmdir()


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
