"""The directory store makes a checkpoint's files durable before the row that announces
them commits; the database store cuts streamed bytes into chunks whatever the writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import event, select

from app import blobs
from app.blobs import BlobWriter, DatabaseStore, DirectoryStore
from app.checkpoints import service as checkpoints_service
from app.checkpoints.models import CheckpointChunk
from app.db import Database

from .test_service import claimed_job


def test_a_directory_checkpoint_is_fsynced_before_its_row_commits(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim = claimed_job(database)
    root = tmp_path / "ckpt"
    happened: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        happened.append("fsync " + os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with database.session() as session:
        event.listen(session, "after_commit", lambda _: happened.append("commit"))
        checkpoints_service.save_checkpoint(
            session, claim=claim, store=DirectoryStore(root), step=3,
            weights=b"w" * 100, state=b"s" * 10, loss=None,
        )  # fmt: skip
        session.commit()

    step_directory = root / claim.job_id / "step-0000003"
    assert happened.index("commit") == len(happened) - 1, happened
    synced = {entry.removeprefix("fsync ") for entry in happened[:-1]}
    # The files' bytes, the renames that name them, and the new directories' entries.
    assert {
        str(step_directory / "weights.partial"),  # fsynced before its rename
        str(step_directory / "state.partial"),
        str(step_directory),
        str(root / claim.job_id),
        str(root),
    } <= synced, happened
    assert (step_directory / "weights.bin").read_bytes() == b"w" * 100


def test_streamed_writes_of_any_size_become_whole_chunks(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "CHUNK_BYTES", 10)
    claim = claimed_job(database)
    content = bytes(range(256)) * 3

    def write_unevenly(writer: BlobWriter) -> None:
        view = memoryview(content)
        for start, end in ((0, 3), (3, 40), (40, 41), (41, 700), (700, len(content))):
            writer.write(view[start:end])

    with database.session() as session:
        saved = checkpoints_service.save_checkpoint(
            session, claim=claim, store=DatabaseStore(), step=1,
            weights=write_unevenly, state=b"", loss=None,
        )  # fmt: skip
        session.commit()
        chunks = session.scalars(
            select(CheckpointChunk.data)
            .where(CheckpointChunk.checkpoint_id == saved.id, CheckpointChunk.part == "weights")
            .order_by(CheckpointChunk.seq)
        ).all()
        assert (saved.weights_bytes, saved.size_bytes) == (len(content), len(content))
    assert b"".join(chunks) == content
    assert {len(chunk) for chunk in chunks[:-1]} == {10}
