"""Checkpoint bytes survive the round trip through either store, and stay fenced."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from app.checkpoints import service as checkpoints_service
from app.checkpoints import store as store_module
from app.checkpoints.store import CheckpointStore, DatabaseStore, DirectoryStore
from app.db import Database
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.spec import JobSpec

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "batch_size": 8,
        "micro_batch_size": 8, "max_steps": 3}  # fmt: skip


def claimed_job(database: Database) -> runs.Claim:
    with database.session() as session:
        job = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC))
        claim = runs.claim_job(session, job_id=job.id, worker="w", lease_timeout=60)
        session.commit()
    assert claim is not None
    return claim


@pytest.fixture(params=["database", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    return DatabaseStore() if request.param == "database" else DirectoryStore(tmp_path / "ckpt")


def test_bytes_round_trip_in_chunks(
    database: Database, store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 1000)  # many chunks from a small blob
    claim = claimed_job(database)
    weights, state = os.urandom(4321), os.urandom(999)
    with database.session() as session:
        checkpoints_service.save_checkpoint(
            session, claim=claim, store=store, step=5, weights=weights, state=state, loss=0.5
        )
        session.commit()
    with database.session() as session:
        found = checkpoints_service.find_checkpoint(session, job_id=claim.job_id)
        directory = tmp_path / "ckpt" if isinstance(store, DirectoryStore) else None
        pieces = list(checkpoints_service.read_part(
            session, checkpoint=found, part="weights", checkpoint_dir=directory
        ))  # fmt: skip
        read_state = b"".join(checkpoints_service.read_part(
            session, checkpoint=found, part="state", checkpoint_dir=directory
        ))  # fmt: skip
    assert (found.step, found.size_bytes, found.weights_bytes, found.loss) == (5, 5320, 4321, 0.5)
    assert b"".join(pieces) == weights and read_state == state
    assert len(pieces) == 5 and max(map(len, pieces)) <= 1000


def test_latest_and_named_checkpoints(database: Database) -> None:
    claim = claimed_job(database)
    with database.session() as session:
        for step in (2, 4, 6):
            checkpoints_service.save_checkpoint(
                session, claim=claim, store=DatabaseStore(), step=step,
                weights=bytes([step]), state=b"s", loss=None,
            )  # fmt: skip
        session.commit()
        assert checkpoints_service.find_checkpoint(session, job_id=claim.job_id).step == 6
        assert checkpoints_service.find_checkpoint(session, job_id=claim.job_id, step=4).step == 4
        with pytest.raises(checkpoints_service.NoCheckpoint):
            checkpoints_service.find_checkpoint(session, job_id=claim.job_id, step=5)
        rows, more = checkpoints_service.list_checkpoints(
            session, job_id=claim.job_id, after_step=2, limit=1
        )
    assert [row.step for row in rows] == [4] and more


def test_saving_the_same_step_again_replaces_it(database: Database) -> None:
    claim = claimed_job(database)
    for content in (b"first", b"second"):
        with database.session() as session:
            checkpoints_service.save_checkpoint(
                session,
                claim=claim,
                store=DatabaseStore(),
                step=3,
                weights=content,
                state=b"",
                loss=None,
            )
            session.commit()
    with database.session() as session:
        found = checkpoints_service.find_checkpoint(session, job_id=claim.job_id)
        data = b"".join(checkpoints_service.read_part(
            session, checkpoint=found, part="weights", checkpoint_dir=None
        ))  # fmt: skip
    assert data == b"second"


def test_a_stale_lease_cannot_save_a_checkpoint(database: Database) -> None:
    claim = claimed_job(database)
    stale = dataclasses.replace(claim, lease=claim.lease + 1)
    with database.session() as session, pytest.raises(runs.LeaseLost):
        checkpoints_service.save_checkpoint(
            session, claim=stale, store=DatabaseStore(), step=1, weights=b"w", state=b"s", loss=None
        )
