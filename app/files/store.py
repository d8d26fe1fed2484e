"""Where uploaded files' bytes live: chunked in the database (default) or in a directory.

The same two choices as checkpoints (app/checkpoints/store.py), for the same reasons.
Both take the upload as it arrives and read one chunk at a time, so a file of a GiB never
sits whole in the API's or a worker's memory. Neither touches the database until the
last byte has arrived: the database store stages the bytes in a temporary file, then
inserts them in the transaction that commits the file's row.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from app.checkpoints.store import CHUNK_BYTES, read_chunks
from app.db import after_commit, read_by_seq
from app.files.models import DataFile, FileChunk


class FileWriter(Protocol):
    """Receives an upload's bytes without the database: a client may take its time, and
    an open transaction would hold a connection (on SQLite, every writer's lock) as long."""

    def write(self, data: bytes) -> None:
        """Append at most CHUNK_BYTES."""

    def finish(self, session: Session) -> None:
        """Make the bytes written so far the file's content (the row commits after)."""

    def discard(self) -> None:
        """Drop what was written: the upload failed or was refused."""


class FileStore(Protocol):
    name: str

    def writer(self, data_file: DataFile) -> FileWriter: ...

    def read(self, session: Session, data_file: DataFile) -> Iterator[bytes]: ...

    def delete(self, session: Session, data_file: DataFile) -> None: ...


class DatabaseFileWriter:
    """Stages the bytes in a temporary file (in memory up to one chunk), then inserts them
    as chunks in the transaction that commits the row."""

    def __init__(self, file_id: str) -> None:
        self.file_id = file_id
        # Closed by finish or discard, which the route always calls.
        self.staged: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=CHUNK_BYTES)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.staged.write(data)

    def finish(self, session: Session) -> None:
        self.staged.seek(0)
        seq = 0
        while data := self.staged.read(CHUNK_BYTES):
            # A Core insert: no ORM object keeps the chunk alive once it has been sent.
            session.execute(insert(FileChunk), {"file_id": self.file_id, "seq": seq, "data": data})
            seq += 1
        self.staged.close()

    def discard(self) -> None:
        self.staged.close()  # chunks already inserted go with the route's rollback


class DatabaseFileStore:
    name = "database"

    def writer(self, data_file: DataFile) -> FileWriter:
        return DatabaseFileWriter(data_file.id)

    def read(self, session: Session, data_file: DataFile) -> Iterator[bytes]:
        return read_by_seq(
            session, FileChunk.data, FileChunk.seq, FileChunk.file_id == data_file.id
        )

    def delete(self, session: Session, data_file: DataFile) -> None:
        session.execute(delete(FileChunk).where(FileChunk.file_id == data_file.id))


class DirectoryFileWriter:
    def __init__(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.partial = target.with_name(f"{target.name}.partial")
        self.handle: BinaryIO = self.partial.open("wb")

    def write(self, data: bytes) -> None:
        self.handle.write(data)

    def finish(self, session: Session) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.partial.replace(self.target)  # readers never see half a file

    def discard(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)
        self.target.unlink(missing_ok=True)  # finished, but the row did not commit


class DirectoryFileStore:
    name = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, data_file: DataFile) -> Path:
        return self.root / data_file.id

    def writer(self, data_file: DataFile) -> FileWriter:
        return DirectoryFileWriter(self.path(data_file))

    def read(self, session: Session, data_file: DataFile) -> Iterator[bytes]:
        return read_chunks(self.path(data_file))

    def delete(self, session: Session, data_file: DataFile) -> None:
        after_commit(session, partial(self.path(data_file).unlink, missing_ok=True))


def store_for(storage: str, files_dir: Path | None) -> FileStore:
    """The store a file's bytes were written to."""
    if storage == "directory":
        if files_dir is None:
            raise RuntimeError("file stored in a directory, but TRAINJOB_FILES_DIR is unset")
        return DirectoryFileStore(files_dir)
    return DatabaseFileStore()


def default_store(files_dir: Path | None) -> FileStore:
    """The store new uploads go to."""
    return DirectoryFileStore(files_dir) if files_dir is not None else DatabaseFileStore()
