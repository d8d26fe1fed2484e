"""Checkpoint bytes survive the round trip through either store, and stay fenced; each
save prunes what `keep_checkpoints` does not keep, bytes and row."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from app import blobs
from app.blobs import BlobStore, DatabaseStore, DirectoryStore
from app.checkpoints import service as checkpoints_service
from app.checkpoints.exceptions import NoCheckpoint
from app.checkpoints.models import Checkpoint, CheckpointChunk
from app.db import Database
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import JobEvent
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
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return DatabaseStore() if request.param == "database" else DirectoryStore(tmp_path / "ckpt")


def test_bytes_round_trip_in_chunks(
    database: Database, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "CHUNK_BYTES", 1000)  # many chunks from a small blob
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
        with pytest.raises(NoCheckpoint):
            checkpoints_service.find_checkpoint(session, job_id=claim.job_id, step=5)
        rows, more = jobs_service.job_rows(
            session, Checkpoint.step, 2, job_id=claim.job_id, limit=1
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


def job_keeping(database: Database, keep: dict[str, int] | None) -> runs.Claim:
    spec = {**SPEC, "keep_checkpoints": keep}
    with database.session() as session:
        job = jobs_service.create_job(session, spec=JobSpec.model_validate(spec))
        claim = runs.claim_job(session, job_id=job.id, worker="w", lease_timeout=60)
        session.commit()
    assert claim is not None
    return claim


def save(
    database: Database,
    claim: runs.Claim,
    store: BlobStore,
    step: int,
    eval_loss: float | None,
    *,
    loss: float | None = None,
    commit: bool = True,
) -> None:
    with database.session() as session:
        checkpoints_service.save_checkpoint(
            session, claim=claim, store=store, step=step, weights=b"w%d" % step,
            state=b"s%d" % step, loss=loss, eval_loss=eval_loss,
        )  # fmt: skip
        if commit:
            session.commit()


def stored_steps(database: Database, job_id: str) -> list[int]:
    with database.session() as session:
        rows, _ = jobs_service.job_rows(session, Checkpoint.step, None, job_id=job_id, limit=1000)
    return [row.step for row in rows]


def step_directories(root: Path, job_id: str) -> list[str]:
    job_directory = root / job_id
    return sorted(path.name for path in job_directory.iterdir()) if job_directory.exists() else []


def test_each_save_keeps_the_last_n_and_best_m_and_deletes_the_others_bytes(
    database: Database, store: BlobStore, tmp_path: Path
) -> None:
    claim = job_keeping(database, {"last": 2, "best": 1})
    eval_losses = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.8, 5: 0.6, 6: 0.95}
    # After each save: the two newest, and the lowest eval_loss so far.
    expected_after = {1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 3, 4], 5: [2, 4, 5], 6: [2, 5, 6]}
    row_ids = {}
    for step, eval_loss in eval_losses.items():
        save(database, claim, store, step, eval_loss)
        assert stored_steps(database, claim.job_id) == expected_after[step], f"after {step}"
        with database.session() as session:
            row_ids[step] = checkpoints_service.find_checkpoint(session, job_id=claim.job_id).id
    with database.session() as session:
        chunk_owners = session.scalars(
            select(CheckpointChunk.checkpoint_id).where(
                CheckpointChunk.checkpoint_id.in_(row_ids.values())
            )
        ).all()
    if isinstance(store, DirectoryStore):
        names = ["step-0000002", "step-0000005", "step-0000006"]
        assert step_directories(tmp_path / "ckpt", claim.job_id) == names
        assert chunk_owners == []
    else:
        assert sorted(set(chunk_owners)) == [row_ids[2], row_ids[5], row_ids[6]]
    with database.session() as session:
        for step in (2, 5, 6):
            found = checkpoints_service.find_checkpoint(session, job_id=claim.job_id, step=step)
            content = b"".join(checkpoints_service.read_part(
                session, checkpoint=found, part="weights", checkpoint_dir=tmp_path / "ckpt"
            ))  # fmt: skip
            assert (content, found.eval_loss) == (b"w%d" % step, eval_losses[step])


def test_without_keep_checkpoints_every_checkpoint_stays(database: Database) -> None:
    claim = job_keeping(database, None)
    for step in range(1, 5):
        save(database, claim, DatabaseStore(), step, 1.0 / step)
    assert stored_steps(database, claim.job_id) == [1, 2, 3, 4]


def test_a_job_without_evaluation_keeps_the_lowest_train_loss(database: Database) -> None:
    claim = job_keeping(database, {"last": 1, "best": 0})
    for step, loss in ((1, 0.8), (2, 0.3), (3, 0.5), (4, 0.4)):
        save(database, claim, DatabaseStore(), step, None, loss=loss)
    assert stored_steps(database, claim.job_id) == [2, 4]


def test_a_rolled_back_save_deletes_no_files(database: Database, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "ckpt")
    claim = job_keeping(database, {"last": 1, "best": 0})
    save(database, claim, store, 1, 0.5)
    # Step 2 would prune step 1, but its transaction never commits (a connection lost):
    # step 1, the one a resume would start from, must still be whole.
    save(database, claim, store, 2, 0.6, commit=False)
    assert stored_steps(database, claim.job_id) == [1]
    step_one = tmp_path / "ckpt" / claim.job_id / "step-0000001"
    assert sorted(path.name for path in step_one.iterdir()) == ["state.bin", "weights.bin"]
    save(database, claim, store, 2, 0.6)
    assert stored_steps(database, claim.job_id) == [1, 2]  # step 1 is the best
    save(database, claim, store, 3, 0.4)
    assert stored_steps(database, claim.job_id) == [3]
    assert step_directories(tmp_path / "ckpt", claim.job_id) == ["step-0000003"]


def test_a_checkpoint_in_a_directory_this_worker_does_not_know_is_kept(
    database: Database, tmp_path: Path
) -> None:
    claim = job_keeping(database, {"last": 1, "best": 0})
    save(database, claim, DirectoryStore(tmp_path / "old"), 1, 0.9)
    for step in (2, 3):  # TRAINJOB_CHECKPOINT_DIR was unset since
        save(database, claim, DatabaseStore(), step, 0.5)
    assert stored_steps(database, claim.job_id) == [1, 3]
    assert step_directories(tmp_path / "old", claim.job_id) == ["step-0000001"]


def test_eval_loss_is_stored_and_non_finite_losses_are_unknown(database: Database) -> None:
    claim = claimed_job(database)
    save(database, claim, DatabaseStore(), 1, 0.25, loss=0.5)
    save(database, claim, DatabaseStore(), 2, math.nan, loss=math.inf)
    with database.session() as session:
        rows, _ = jobs_service.job_rows(
            session, Checkpoint.step, None, job_id=claim.job_id, limit=10
        )
        events = jobs_service.job_rows(
            session,
            JobEvent.id,
            None,
            job_id=claim.job_id,
            limit=10,
            where=[JobEvent.type.in_(["checkpoint"])],
        )[0]
    assert [(row.loss, row.eval_loss) for row in rows] == [(0.5, 0.25), (None, None)]
    assert [(e.data["loss"], e.data["eval_loss"]) for e in events] == [(0.5, 0.25), (None, None)]
