"""Where blobs (a checkpoint's parts, an uploaded file) live: chunked in the database
(default) or as files in a directory.

The database store needs no shared disk between the API and workers on different
machines; the directory store (TRAINJOB_CHECKPOINT_DIR, TRAINJOB_FILES_DIR) suits a
shared volume or a mounted bucket and keeps large blobs out of the database. Bytes go in
as they come and out a chunk at a time, so that a blob of a GiB never sits whole in a
process's memory: a checkpoint's part goes through a `writer` as the worker serialises
it; an upload goes to a `stage` that touches no database until its last byte.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO

from sqlalchemy import ColumnElement, delete, func, insert, select
from sqlalchemy.orm import Session

from app.checkpoints.models import CheckpointChunk
from app.db import after_commit, read_by_seq
from app.files.models import FileChunk

CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Blob:
    """Where one blob's bytes are: in the database, the rows of `table` whose columns have
    the values of `key`, numbered by `seq`; in a directory, the file `path` under its root."""

    table: type[CheckpointChunk] | type[FileChunk]
    key: dict[str, Any]
    path: str

    def where(self) -> list[ColumnElement[bool]]:
        return [getattr(self.table, column) == value for column, value in self.key.items()]

    def insert(self, session: Session, seq: int, data: bytes) -> None:
        # A Core insert: no ORM object keeps the chunk alive once it has been sent.
        session.execute(insert(self.table), {**self.key, "seq": seq, "data": data})


class ChunkWriter:
    """A file-like sink (torch.save writes into it) that cuts what it is given, in any
    sizes, into CHUNK_BYTES rows, inserted as each one fills."""

    def __init__(self, session: Session, blob: Blob) -> None:
        self.session = session
        self.blob = blob
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
                self._insert()
        self.size += size
        return size

    def flush(self) -> None:
        pass  # a partial chunk waits for more bytes or for finish()

    def finish(self) -> int:
        """Make the bytes written the blob's content (the row commits after); their size."""
        if self.pending or self.seq == 0:  # an empty part is one empty chunk
            self._insert()
        return self.size

    def _insert(self) -> None:
        self.blob.insert(self.session, self.seq, bytes(self.pending))
        self.pending.clear()
        self.seq += 1


class StagedChunks:
    """An upload for the database store: its bytes wait in a temporary file (in memory up
    to one chunk), then go in as chunks in the transaction that commits the row."""

    def __init__(self, blob: Blob) -> None:
        self.blob = blob
        # Closed by finish or discard, which the route always calls.
        self.staged: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=CHUNK_BYTES)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.staged.write(data)

    def finish(self, session: Session) -> None:
        with self.staged:
            self.staged.seek(0)
            for seq, data in enumerate(iter(partial(self.staged.read, CHUNK_BYTES), b"")):
                self.blob.insert(session, seq, data)

    def discard(self) -> None:
        self.staged.close()  # chunks already inserted go with the route's rollback


class FileWriter:
    """Writes `<name>.partial`, then makes it the blob's file durably: the row that says
    the blob exists commits after this, so its bytes must survive a power cut first."""

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

    def finish(self, session: Session | None = None) -> int:
        """Make the bytes written the blob's content (the row commits after); their size.
        A file needs no `session` (a staged upload's chunks do)."""
        with self.handle:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.partial.replace(self.target)  # readers never see half a file
        _fsync_directory(self.target.parent)  # the rename itself
        return self.size

    def discard(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)
        self.target.unlink(missing_ok=True)  # finished, but the row did not commit


BlobWriter = ChunkWriter | FileWriter


class DatabaseStore:
    name = "database"

    def writer(self, session: Session, blob: Blob) -> BlobWriter:
        return ChunkWriter(session, blob)

    def stage(self, blob: Blob) -> StagedChunks:
        # Not the session: a client may take its time, and an open transaction would hold
        # a connection (on SQLite, every writer's lock) as long.
        return StagedChunks(blob)

    def read(self, session: Session, blob: Blob) -> Iterator[bytes]:
        return read_by_seq(session, blob.table.data, blob.table.seq, *blob.where())

    def size(self, session: Session, blob: Blob) -> int | None:
        """The blob's size in bytes; None when there is no such blob."""
        total = session.scalar(select(func.sum(func.length(blob.table.data))).where(*blob.where()))
        return None if total is None else int(total)

    def delete(self, session: Session, *blobs: Blob) -> None:
        for blob in blobs:
            session.execute(delete(blob.table).where(*blob.where()))

    # For blobs whose rows this transaction deletes: chunks are rows, they go with it.
    discard = delete


class DirectoryStore:
    name = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root

    def writer(self, session: Session, blob: Blob) -> BlobWriter:
        return FileWriter(self.root / blob.path)

    def stage(self, blob: Blob) -> FileWriter:
        return FileWriter(self.root / blob.path)

    def read(self, session: Session, blob: Blob) -> Iterator[bytes]:
        with (self.root / blob.path).open("rb") as handle:
            yield from iter(partial(handle.read, CHUNK_BYTES), b"")

    def size(self, session: Session, blob: Blob) -> int | None:
        """The blob's size in bytes; None when there is no such blob."""
        try:
            return (self.root / blob.path).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, session: Session, *blobs: Blob) -> None:
        for blob in blobs:
            path = self.root / blob.path
            path.unlink(missing_ok=True)
            path.with_suffix(".partial").unlink(missing_ok=True)
            if path.parent != self.root:  # a directory of its own (a checkpoint's step)
                with contextlib.suppress(OSError):  # not empty, gone, or holding others'
                    path.parent.rmdir()

    def discard(self, session: Session, *blobs: Blob) -> None:
        """For blobs whose rows this transaction deletes: their files go only if it
        commits (perhaps the checkpoint a resume starts from, a file a job reads)."""
        after_commit(session, partial(self.delete, session, *blobs))


BlobStore = DatabaseStore | DirectoryStore


def _make_directories(directory: Path) -> None:
    """mkdir -p, and fsync the parent of each directory it creates, so that the new
    entries are as durable as the files that will be fsynced inside them."""
    if directory.is_dir():
        return
    _make_directories(directory.parent)
    with contextlib.suppress(FileExistsError):  # another process made it meanwhile
        directory.mkdir()
    _fsync_directory(directory.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def store_for(storage: str, directory: Path | None, *, unset: str) -> BlobStore:
    """The store a row's bytes were written to (its `storage`); `unset`, the error when
    that is a directory whose setting is unset now."""
    if storage != DirectoryStore.name:
        return DatabaseStore()
    if directory is None:
        raise RuntimeError(unset)
    return DirectoryStore(directory)


def default_store(directory: Path | None) -> BlobStore:
    """The store new bytes go to: the directory, where one is set."""
    return DirectoryStore(directory) if directory is not None else DatabaseStore()
