"""Uploaded data files, their bytes in chunks when stored in the database, and which
jobs use which file (so that a file in use cannot be deleted, and a job waiting for a
file's validation can be found when it ends)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow


class DataFile(Base):
    __tablename__ = "files"

    # "file_" + 12 hex digits of milliseconds + 12 random: sorts by creation time.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(8))  # "jsonl", "csv" or "npz"
    # What the rows hold, found by validation: text, prompt_completion, text_label,
    # classification, regression.
    kind: Mapped[str | None] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    errors: Mapped[list[str] | None] = mapped_column(JSON)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    storage: Mapped[str] = mapped_column(String(16))  # "database" or "directory"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Deliveries of its validation that began: a worker process killed while checking
    # the file (out of memory) never records a result, and its message comes back.
    validation_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_files_tenant_id", "tenant", "id"),
        # The reaper's look for files whose validation message was lost.
        Index("ix_files_status_id", "status", "id"),
    )


class FileChunk(Base):
    """A file's bytes in pieces of at most a few MiB, written as the upload arrives."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class JobFile(Base):
    """A file a job trains or evaluates on."""

    __tablename__ = "job_files"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16))  # "train" or "validation"
