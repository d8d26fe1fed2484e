"""Uploaded files: receive, read, list, delete. Services flush; the route commits."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.blobs import Blob, BlobStore, store_for
from app.db import page, utcnow
from app.files.exceptions import BadUpload, FileInUse, FileNotFound
from app.files.formats import FORMATS, detect_format
from app.files.models import DataFile, FileChunk, JobFile
from app.files.schemas import PURPOSE
from app.ids import is_file_id, new_file_id
from app.jobs.models import Job
from app.jobs.runs import ACTIVE_STATUSES

MAX_LISTED_JOBS = 10
MAX_FILENAME_CHARACTERS = 255


def clean_filename(name: str) -> str:
    """The name to keep and show: no directories, no control or invisible formatting
    characters (a NUL, a right-to-left override), at most 255 characters, extension kept."""
    base = re.split(r"[/\\]", name)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    if len(base) > MAX_FILENAME_CHARACTERS:
        _, dot, suffix = base.rpartition(".")
        extension = f".{suffix}" if dot and len(suffix) <= 16 else ""
        base = base[: MAX_FILENAME_CHARACTERS - len(extension)] + extension
    return base or "upload"


class Upload:
    """One file as it arrives: its row, its bytes going to the store's writer, their size
    and SHA-256. Nothing reaches the database before `finish`: receiving holds no
    connection, however slowly the client sends."""

    def __init__(self, *, store: BlobStore, tenant: str, filename: str) -> None:
        self.row = DataFile(
            id=new_file_id(),
            tenant=tenant,
            filename=clean_filename(filename),
            format="",  # known once the whole form has been read
            kind=None,
            size_bytes=0,
            sha256="",
            status="validating",
            errors=[],
            stats=None,
            storage=store.name,
            created_at=utcnow(),
        )
        self.writer = store.stage(_blob(self.row))
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Take the next piece of the file (at most CHUNK_BYTES)."""
        self.writer.write(data)
        self.digest.update(data)
        self.size += len(data)

    def finish(self, session: Session, *, format: str) -> DataFile:
        """The whole file has arrived: add its row, with its format, size and digest, and
        its bytes to the session (the route commits)."""
        self.row.format = format
        self.row.size_bytes = self.size
        self.row.sha256 = self.digest.hexdigest()
        session.add(self.row)
        session.flush()  # the chunks refer to the row
        self.writer.finish(session)
        return self.row

    def discard(self) -> None:
        """Drop the bytes written outside the transaction (the route rolls back the rest)."""
        self.writer.discard()


def check_format(value: str) -> str:
    """A format given explicitly; BadUpload naming the `format` field when it is none."""
    if value not in FORMATS:
        raise BadUpload("format", f"{value[:40]!r} is not one of {', '.join(FORMATS)}")
    return value


def check_purpose(value: str) -> None:
    """OpenAI's `purpose` upload field: every file here is training data, so only
    `fine-tune` (BadUpload naming the field otherwise)."""
    if value != PURPOSE:
        raise BadUpload(
            "purpose",
            f"{value[:40]!r} is not supported: every trainjob file is training data, "
            f"upload it with purpose {PURPOSE!r} (or without purpose)",
        )


def upload_format(explicit: str | None, filename: str) -> str:
    """The format given with the upload (checked as it arrived), else the one its name says."""
    detected = explicit or detect_format(filename)
    if detected is None:
        raise BadUpload(
            "format",
            f"cannot tell the format from the name {filename[:80]!r}: give `format` "
            f"({', '.join(FORMATS)})",
        )
    return detected


def get_file(session: Session, *, file_id: str, tenant: str | None = None) -> DataFile:
    """The file, or FileNotFound; with `tenant`, another tenant's file is not found either."""
    data_file = session.get(DataFile, file_id) if is_file_id(file_id) else None
    if data_file is None or (tenant is not None and data_file.tenant != tenant):
        raise FileNotFound(file_id)
    return data_file


def list_files(
    session: Session,
    *,
    limit: int,
    after: str | None = None,
    status: str | None = None,
    tenant: str | None = None,
) -> tuple[list[DataFile], bool]:
    """Newest first; `after` is the id of the last file of the previous page."""
    query = select(DataFile).order_by(DataFile.id.desc())
    if tenant is not None:
        query = query.where(DataFile.tenant == tenant)
    if status is not None:
        query = query.where(DataFile.status == status)
    if after is not None:
        query = query.where(DataFile.id < after)
    return page(session, query, limit)


def delete_file(
    session: Session, *, file_id: str, files_dir: Path | None, tenant: str | None = None
) -> None:
    """Delete the file and its bytes; FileInUse while a queued or running job uses it."""
    data_file = get_file(session, file_id=file_id, tenant=tenant)
    # Lock the row first: a submit that links a job to the file now waits for this
    # transaction (and then finds no file), or committed its link before we look.
    session.refresh(data_file, with_for_update=True)
    using = list(
        session.scalars(
            select(JobFile.job_id)
            .join(Job, Job.id == JobFile.job_id)
            .where(JobFile.file_id == file_id, Job.status.in_(ACTIVE_STATUSES))
            .order_by(JobFile.job_id)
            .limit(MAX_LISTED_JOBS)
        )
    )
    if using:
        raise FileInUse(file_id, using)
    _store(data_file, files_dir).discard(session, _blob(data_file))
    session.delete(data_file)
    session.flush()


def read_content(
    session: Session, *, data_file: DataFile, files_dir: Path | None
) -> Iterator[bytes]:
    """The file's bytes, one chunk (at most CHUNK_BYTES) at a time."""
    return _store(data_file, files_dir).read(session, _blob(data_file))


def _blob(data_file: DataFile) -> Blob:
    """The file's chunk rows, or its file: `<root>/<file_id>`."""
    return Blob(FileChunk, {"file_id": data_file.id}, data_file.id)


def _store(data_file: DataFile, files_dir: Path | None) -> BlobStore:
    unset = "file stored in a directory, but TRAINJOB_FILES_DIR is unset"
    return store_for(data_file.storage, files_dir, unset=unset)
