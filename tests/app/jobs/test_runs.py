"""A worker's claim, heartbeat, progress and outcome, fenced by the lease, on both databases."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.blobs import DatabaseStore, DirectoryStore
from app.checkpoints import service as checkpoints_service
from app.checkpoints.models import Checkpoint
from app.db import Database
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import Job
from tests.app.files.stored_files import add_file, create_job, text_job_spec, valid_text_file
from tests.app.jobs.helpers import (
    LEASE,
    age_heartbeat,
    attempt_rows,
    claim,
    create,
    event_count,
    last_event,
    load,
    metric,
    metric_steps,
    try_claim,
)


def progress(database: Database, taken: runs.Claim, steps: range) -> None:
    with database.session() as session:
        runs.record_progress(
            session,
            claim=taken,
            job_values={"step": steps[-1]},
            metrics=[metric(step) for step in steps],
            events=[],
        )
        session.commit()


def checkpoint(database: Database, taken: runs.Claim, step: int) -> None:
    with database.session() as session:
        checkpoints_service.save_checkpoint(
            session,
            claim=taken,
            store=DatabaseStore(),
            step=step,
            weights=b"w",
            state=b"s",
            loss=None,
        )
        session.commit()


def test_a_queued_job_is_claimed_once_and_its_run_recorded(database: Database) -> None:
    job_id = create(database)
    first = claim(database, job_id, "worker-a")
    assert (first.lease, first.attempt, first.resumed_from_step) == (1, 1, 0)
    assert first.runtime_seconds == 0.0
    job = load(database, job_id)
    assert (job.status, job.worker, job.attempts, job.lease) == ("running", "worker-a", 1, 1)
    assert job.started_at is not None and job.heartbeat_at is not None
    [row] = attempt_rows(database, job_id)
    assert (row.attempt, row.worker, row.resumed_from_step) == (1, "worker-a", 0)
    assert (row.reason, row.counted, row.ended_at) == (None, True, None)
    assert last_event(database, job_id) == (
        "status",
        {"status": "running", "worker": "worker-a", "attempt": 1, "resumed_from_step": 0},
    )
    events = event_count(database, job_id)

    assert try_claim(database, job_id, "worker-b") is None  # a duplicate delivery
    again = load(database, job_id)
    assert (again.status, again.worker, again.lease) == ("running", "worker-a", 1)
    assert again.attempts == 1
    assert again.heartbeat_at == job.heartbeat_at
    assert len(attempt_rows(database, job_id)) == 1 and event_count(database, job_id) == events


def test_a_live_run_keeps_its_job_until_its_heartbeat_is_older_than_the_lease(
    database: Database,
) -> None:
    job_id = create(database)
    lost = claim(database, job_id, "worker-a")
    progress(database, lost, range(1, 4))
    checkpoint(database, lost, 3)
    progress(database, lost, range(4, 6))  # trained past the checkpoint, then died
    with database.session() as session:
        runs.renew_lease(session, claim=lost, runtime_seconds=12.5)
        session.commit()

    age_heartbeat(database, job_id, LEASE / 2)
    assert try_claim(database, job_id, "worker-b") is None  # late, but within the lease
    assert load(database, job_id).worker == "worker-a"

    age_heartbeat(database, job_id, LEASE * 2)
    taken = claim(database, job_id, "worker-b")
    assert (taken.lease, taken.attempt, taken.resumed_from_step) == (2, 2, 3)
    assert taken.runtime_seconds == 12.5  # max_runtime_seconds counts every attempt
    job = load(database, job_id)
    assert (job.status, job.worker, job.step) == ("running", "worker-b", 3)
    assert (job.lease, job.attempts) == (2, 2)
    assert metric_steps(database, job_id) == [1, 2, 3]  # steps 4 and 5 are trained again
    old, new = attempt_rows(database, job_id)
    assert (old.attempt, old.worker, old.reason) == (1, "worker-a", "worker_lost")
    assert old.ended_at is not None
    assert (new.attempt, new.worker, new.resumed_from_step, new.reason) == (2, "worker-b", 3, None)
    assert new.ended_at is None
    assert last_event(database, job_id)[1]["resumed_from_step"] == 3


def test_a_run_without_a_checkpoint_starts_over(database: Database) -> None:
    job_id = create(database)
    lost = claim(database, job_id, "worker-a")
    progress(database, lost, range(1, 3))
    age_heartbeat(database, job_id, LEASE * 2)
    taken = claim(database, job_id, "worker-b")
    assert taken.resumed_from_step == 0
    assert load(database, job_id).step == 0 and metric_steps(database, job_id) == []


def test_a_job_whose_attempts_are_used_up_is_not_claimed(database: Database) -> None:
    job_id = create(database, max_attempts=2)
    claim(database, job_id, "worker-a")
    age_heartbeat(database, job_id, LEASE * 2)
    assert claim(database, job_id, "worker-b").attempt == 2
    age_heartbeat(database, job_id, LEASE * 2)
    assert try_claim(database, job_id, "worker-c") is None
    job = load(database, job_id)
    assert (job.worker, job.attempts, job.lease) == ("worker-b", 2, 2)
    assert [row.worker for row in attempt_rows(database, job_id)] == ["worker-a", "worker-b"]


def test_a_job_waiting_for_a_validating_file_is_not_sendable_nor_claimed(
    database: Database,
) -> None:
    waiting = create_job(database, text_job_spec(add_file(database)))
    ready = create_job(database, text_job_spec(valid_text_file(database)))

    with database.session() as session:
        sendable = session.scalars(
            select(Job.id).where(Job.id.in_([waiting, ready]), runs.sendable())
        ).all()
    assert sendable == [ready]
    assert try_claim(database, waiting, "worker") is None
    assert load(database, waiting).status == "queued"
    assert claim(database, ready, "worker").attempt == 1


def test_a_worker_that_lost_its_job_writes_nothing(database: Database, tmp_path: Path) -> None:
    job_id = create(database)
    lost = claim(database, job_id, "worker-a")
    age_heartbeat(database, job_id, LEASE * 2)
    claim(database, job_id, "worker-b")
    before = load(database, job_id)
    events = event_count(database, job_id)
    store = DirectoryStore(tmp_path / "checkpoints")

    writes: list[Callable[[Session], object]] = [
        lambda session: runs.renew_lease(session, claim=lost, runtime_seconds=99.0),
        lambda session: runs.record_progress(
            session,
            claim=lost,
            job_values={"step": 7},
            metrics=[metric(7)],
            events=[("oom_backoff", {"old_micro_batch_size": 8, "new_micro_batch_size": 4})],
        ),
        lambda session: runs.finish_job(session, claim=lost, status="succeeded"),
        lambda session: runs.finish_job(
            session, claim=lost, status="failed", error=("nan_loss", "loss is nan")
        ),
        lambda session: runs.hand_back(session, claim=lost, reason="shutdown", counted=False),
        lambda session: checkpoints_service.save_checkpoint(
            session, claim=lost, store=store, step=7, weights=b"w", state=b"s", loss=None
        ),
    ]
    for write in writes:
        with database.session() as session:
            with pytest.raises(runs.LeaseLost):
                write(session)
            session.commit()  # even a caller that commits anyway stores nothing

    after = load(database, job_id)
    assert (after.status, after.worker, after.step, after.lease) == ("running", "worker-b", 0, 2)
    assert after.heartbeat_at == before.heartbeat_at and after.runtime_seconds == 0.0
    assert after.error_type is None and after.finished_at is None
    assert metric_steps(database, job_id) == [] and event_count(database, job_id) == events
    with database.session() as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
    assert not (tmp_path / "checkpoints").exists()
    old, new = attempt_rows(database, job_id)
    assert old.reason == "worker_lost" and new.ended_at is None and new.reason is None


def test_a_finished_job_rejects_its_own_worker_too(database: Database) -> None:
    job_id = create(database)
    taken = claim(database, job_id, "worker-a")
    with database.session() as session:
        runs.finish_job(session, claim=taken, status="succeeded")
        session.commit()
        with pytest.raises(runs.LeaseLost):
            runs.renew_lease(session, claim=taken, runtime_seconds=1.0)
    assert try_claim(database, job_id, "worker-b") is None  # final: no retry follows


def test_the_heartbeat_carries_cancel_and_release_requests(database: Database) -> None:
    # Worker names of their own: the Postgres database is shared by the whole session.
    stopping, staying = f"stopping-{secrets.token_hex(4)}", f"staying-{secrets.token_hex(4)}"
    mine, other, cancelled = create(database), create(database), create(database)
    queued = create(database)
    taken = claim(database, mine, stopping)
    other_claim = claim(database, other, staying)
    to_cancel = claim(database, cancelled, staying)
    with database.session() as session:
        assert runs.renew_lease(session, claim=taken, runtime_seconds=1.0) == runs.Heartbeat(
            cancel_requested=False, release_requested=False
        )
        jobs_service.request_cancel(session, job_id=cancelled)
        session.commit()
        heartbeat = runs.renew_lease(session, claim=to_cancel, runtime_seconds=1.0)
        session.commit()
    assert heartbeat.cancel_requested and not heartbeat.release_requested
    assert load(database, cancelled).status == "cancelling"  # still this worker's to stop

    with database.session() as session:
        assert runs.request_release(session, worker=stopping) == 1
        session.commit()
        mine_beat = runs.renew_lease(session, claim=taken, runtime_seconds=2.0)
        other_beat = runs.renew_lease(session, claim=other_claim, runtime_seconds=2.0)
        cancel_beat = runs.record_progress(
            session, claim=to_cancel, job_values={}, metrics=[], events=[]
        )
        session.commit()
    assert mine_beat == runs.Heartbeat(cancel_requested=False, release_requested=True)
    assert other_beat == runs.Heartbeat(cancel_requested=False, release_requested=False)
    assert cancel_beat == runs.Heartbeat(cancel_requested=True, release_requested=False)
    assert not load(database, queued).release_requested
    assert load(database, mine).runtime_seconds == 2.0


def test_a_shutdown_hand_back_is_not_counted_and_the_next_run_resumes(
    database: Database,
) -> None:
    job_id = create(database, max_attempts=1)  # the only attempt survives a shutdown
    worker = f"stopping-{secrets.token_hex(4)}"
    first = claim(database, job_id, worker)
    progress(database, first, range(1, 5))
    checkpoint(database, first, 4)
    with database.session() as session:
        assert runs.request_release(session, worker=worker) == 1
        requeued = runs.hand_back(
            session, claim=first, reason="shutdown", counted=False, runtime_seconds=7.5
        )
        session.commit()
    assert requeued is True
    job = load(database, job_id)
    assert (job.status, job.attempts, job.worker) == ("queued", 0, None)
    # The caller sends the message right after this commit: the reaper does not send another.
    assert job.enqueued_at is not None
    assert job.runtime_seconds == 7.5 and job.finished_at is None and job.error_type is None
    [row] = attempt_rows(database, job_id)
    assert (row.reason, row.counted) == ("shutdown", False) and row.ended_at is not None
    assert last_event(database, job_id) == ("status", {"status": "queued", "reason": "shutdown"})

    second = claim(database, job_id, "worker-b")
    assert (second.lease, second.attempt, second.resumed_from_step) == (2, 1, 4)
    assert second.runtime_seconds == 7.5
    with database.session() as session:
        beat = runs.renew_lease(session, claim=second, runtime_seconds=8.0)
        session.commit()
    assert not beat.release_requested  # the new run was not asked to stop
    assert [(r.attempt, r.worker, r.reason, r.counted) for r in attempt_rows(database, job_id)] == [
        (1, worker, "shutdown", False),
        (2, "worker-b", None, True),
    ]


def test_a_counted_hand_back_requeues_while_attempts_remain(database: Database) -> None:
    job_id = create(database, max_attempts=2)
    first = claim(database, job_id, "worker-a")
    with database.session() as session:
        assert runs.hand_back(session, claim=first, reason="connection_lost", counted=True)
        session.commit()
    job = load(database, job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    [row] = attempt_rows(database, job_id)
    assert (row.reason, row.counted) == ("connection_lost", True)
    assert claim(database, job_id, "worker-b").attempt == 2


def test_a_counted_hand_back_fails_the_job_once_attempts_are_used_up(database: Database) -> None:
    job_id = create(database, max_attempts=1)
    taken = claim(database, job_id, "worker-a")
    with database.session() as session:
        requeued = runs.hand_back(
            session, claim=taken, reason="connection_lost", counted=True, runtime_seconds=3.0
        )
        session.commit()
    assert requeued is False
    job = load(database, job_id)
    assert (job.status, job.error_type, job.attempts) == ("failed", "connection_lost", 1)
    assert job.error_message and job.finished_at is not None and job.runtime_seconds == 3.0
    [row] = attempt_rows(database, job_id)
    assert (row.reason, row.counted) == ("connection_lost", True) and row.ended_at is not None
    assert last_event(database, job_id)[1]["status"] == "failed"
    assert try_claim(database, job_id, "worker-b") is None


def test_a_hand_back_of_a_job_being_cancelled_cancels_it(database: Database) -> None:
    job_id = create(database)
    taken = claim(database, job_id, "worker-a")
    with database.session() as session:
        jobs_service.request_cancel(session, job_id=job_id)
        session.commit()
        requeued = runs.hand_back(session, claim=taken, reason="shutdown", counted=False)
        session.commit()
    assert requeued is False
    job = load(database, job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.error_type is None
    [row] = attempt_rows(database, job_id)
    assert row.reason == "cancelled" and row.ended_at is not None
    assert try_claim(database, job_id, "worker-b") is None


def test_finish_job_closes_the_run_with_its_outcome(database: Database) -> None:
    succeeded, failed = create(database), create(database)
    to_succeed, to_fail = claim(database, succeeded, "w"), claim(database, failed, "w")
    with database.session() as session:
        runs.finish_job(session, claim=to_succeed, status="succeeded")
        runs.finish_job(
            session,
            claim=to_fail,
            status="failed",
            error=("out_of_memory", "even micro-batch 1 does not fit"),
        )
        session.commit()
    for job_id, reason in ((succeeded, "succeeded"), (failed, "out_of_memory")):
        [row] = attempt_rows(database, job_id)
        assert row.reason == reason and row.ended_at is not None and row.counted
    job = load(database, failed)
    assert (job.status, job.error_type) == ("failed", "out_of_memory")
    assert job.error_message == "even micro-batch 1 does not fit"
    assert load(database, succeeded).status == "succeeded"
