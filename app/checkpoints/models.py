"""Checkpoint metadata, and their bytes in chunks when stored in the database."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow
from app.jobs.models import AutoIncrementId


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(AutoIncrementId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    weights_bytes: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float | None] = mapped_column(Float)
    # Of the last evaluation at or before this step; what `keep_checkpoints.best` ranks by.
    eval_loss: Mapped[float | None] = mapped_column(Float)
    storage: Mapped[str] = mapped_column(String(16))  # "database" or "directory"

    __table_args__ = (UniqueConstraint("job_id", "step"),)


class CheckpointChunk(Base):
    """A checkpoint part ("weights" or "state") cut into pieces of at most a few MiB,
    so that neither side ever holds one huge value in a single row or message."""

    __tablename__ = "checkpoint_chunks"

    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    part: Mapped[str] = mapped_column(String(8), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
