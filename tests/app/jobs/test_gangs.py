"""Gang scheduling of multi-node jobs in the database (app/jobs/gangs.py), on both
databases: a job on N nodes is claimed only when N workers are free, all or nothing,
its open slots are taken once each, a gang that does not form is given up holding
nothing, and a slot of a run that is over is void."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from app.db import Database, upgrade
from app.jobs import devices, gangs, runs, scheduling
from app.jobs.models import Job, JobEvent, JobSlot
from tests.app.jobs.helpers import LEASE, claim, create
from worker.presence import announce, withdraw

POLICY = scheduling.Policy()


@pytest.fixture(params=["postgres", "sqlite"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, make_postgres_database: Callable[[], str]
) -> Iterator[Database]:
    """Of its own: the claim takes the best job of the whole table."""
    url = make_postgres_database() if request.param == "postgres" else f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


def two_nodes(database: Database, **changes: Any) -> str:
    return create(database, nodes=2, batch_size=16, **changes)


def claim_next(database: Database, hint: str, worker: str, free_nodes: int) -> runs.Claim | None:
    with database.session() as session:
        taken = scheduling.claim_next(
            session,
            hint=hint,
            worker=worker,
            lease_timeout=LEASE,
            policy=POLICY,
            free_nodes=free_nodes,
        )
        session.commit()
    return taken


def open_gang(database: Database, taken: runs.Claim, nodes: int = 2) -> None:
    with database.session() as session:
        gangs.open_gang(
            session,
            claim=taken,
            nodes=nodes,
            worker="leader",
            address="127.0.0.1",
            port=29500,
            claim_data={"lease": taken.lease},
            lease_timeout=LEASE,
        )
        session.commit()


def take_slot(database: Database, worker: str) -> gangs.Slot | None:
    with database.session() as session:
        slot = gangs.claim_open_slot(session, worker=worker, devices=1, lease_timeout=LEASE)
        session.commit()
    return slot


def slots(database: Database) -> list[tuple[int, str | None]]:
    with database.session() as session:
        rows = session.execute(select(JobSlot.slot, JobSlot.worker).order_by(JobSlot.slot))
        return [(row.slot, row.worker) for row in rows]


def warnings(database: Database, job_id: str) -> list[str]:
    with database.session() as session:
        events = session.scalars(
            select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "warning")
        )
        return [data["message"] for data in events]


def test_a_multi_node_job_waits_holding_nothing_until_its_nodes_are_free(
    database: Database,
) -> None:
    job = two_nodes(database)
    assert claim_next(database, job, "w1", free_nodes=1) is None
    assert claim_next(database, job, "w1", free_nodes=1) is None
    with database.session() as session:
        assert session.get(Job, job).status == "queued"  # type: ignore[union-attr]
    assert slots(database) == []
    assert warnings(database, job) == [
        "waits: it needs 2 worker nodes at once and 1 is free now; it holds none of them "
        "while it waits"
    ]
    with database.session() as session:
        assert gangs.jobs_wait_for_nodes(session, devices=1)
    # A one-node job behind it runs meanwhile: the wait blocks nothing.
    single = create(database)
    taken = claim_next(database, job, "w1", free_nodes=1)
    assert taken is not None and taken.job_id == single
    taken = claim_next(database, job, "w2", free_nodes=2)
    assert taken is not None and taken.job_id == job


def test_an_elastic_job_may_start_on_its_minimum_of_nodes(database: Database) -> None:
    job = create(database, nodes=3, batch_size=24, elastic={"min_nodes": 2})
    assert claim_next(database, job, "w1", free_nodes=1) is None
    taken = claim_next(database, job, "w1", free_nodes=2)
    assert taken is not None and taken.job_id == job


def test_each_open_slot_is_taken_by_one_worker_and_the_gang_is_all_or_nothing(
    database: Database,
) -> None:
    job = create(database, nodes=3, batch_size=24)
    taken = claim_next(database, job, "leader", free_nodes=3)
    assert taken is not None
    open_gang(database, taken, nodes=3)
    # A worker holds one node of a gang at most (its pool children share its devices).
    assert take_slot(database, "leader") is None
    first, second = take_slot(database, "f1"), take_slot(database, "f2")
    assert take_slot(database, "f3") is None
    assert first is not None and second is not None
    assert {first.slot, second.slot} == {1, 2}
    assert (first.nodes, first.address, first.port, first.lease) == (3, "127.0.0.1", 29500, 1)
    assert slots(database) == [(0, "leader"), (1, "f1"), (2, "f2")]
    with database.session() as session:
        state = gangs.gang_state(session, claim=taken)
    assert (state.filled, state.nodes, state.lost, state.running) == (3, 3, 0, 2)


def test_a_gang_that_does_not_form_is_given_up_without_counting_an_attempt(
    database: Database,
) -> None:
    job = two_nodes(database)
    taken = claim_next(database, job, "leader", free_nodes=2)
    assert taken is not None
    open_gang(database, taken)
    with database.session() as session:  # what its leader does when the wait is over
        gangs.close_gang(session, job_id=job)
        assert runs.hand_back(session, claim=taken, reason=gangs.INCOMPLETE, counted=False)
        session.commit()
    assert slots(database) == []
    with database.session() as session:
        row = session.get(Job, job)
        assert row is not None
        assert (row.status, row.attempts, row.worker) == ("queued", 0, None)
    # Nothing is left for a follower to take, and the job can be claimed again.
    assert take_slot(database, "late") is None
    assert claim_next(database, job, "other", free_nodes=2) is not None


def test_a_slot_of_a_run_that_is_over_is_void(database: Database) -> None:
    job = two_nodes(database)
    taken = claim_next(database, job, "leader", free_nodes=2)
    assert taken is not None
    open_gang(database, taken)
    slot = take_slot(database, "follower")
    assert slot is not None
    with database.session() as session:
        assert gangs.renew_slot(session, slot=slot, worker="follower", lease_timeout=LEASE)
        # The run ends without its leader closing the gang (it died, the reaper re-queued
        # the job): the job's lease moves on with the next claim.
        runs.hand_back(session, claim=taken, reason="worker_lost", counted=True)
        session.commit()
    again = claim(database, job, "next-leader")
    assert again.lease == taken.lease + 1
    with database.session() as session:
        assert not gangs.renew_slot(session, slot=slot, worker="follower", lease_timeout=LEASE)
        # Its open slots are no one's to take either.
        assert gangs.claim_open_slot(session, worker="x", devices=1, lease_timeout=LEASE) is None
        assert gangs.delete_void_slots(session) == 2
        session.commit()
    assert slots(database) == []


def test_a_follower_s_released_slot_carries_rank_zero_s_outcome_to_the_leader(
    database: Database,
) -> None:
    job = two_nodes(database)
    taken = claim_next(database, job, "leader", free_nodes=2)
    assert taken is not None
    open_gang(database, taken)
    slot = take_slot(database, "follower")
    assert slot is not None
    with database.session() as session:
        gangs.release_slot(session, slot=slot, worker="follower", outcome={"status": "x"})
        session.commit()
    with database.session() as session:
        state = gangs.gang_state(session, claim=taken)
    assert (state.running, state.lost, state.outcome) == (0, 0, {"status": "x"})


def test_free_nodes_counts_followers_busy_and_open_slots_reserved(
    database: Database, redis_client: redis.Redis
) -> None:
    queue = f"gangs-{secrets.token_hex(4)}"
    names = [f"{name}-{secrets.token_hex(4)}" for name in ("a", "b", "c")]
    for name in names:
        info = {"name": name, "hostname": "test", "pid": 1, "device": "cpu",
                "cuda_visible_devices": None, "queues": [queue], "concurrency": 1,
                "started_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
        announce(redis_client, info, ttl_seconds=60)
    try:

        def free() -> int:
            with database.session() as session:
                return devices.free_nodes(session, redis_client, queue=queue, devices=1)

        assert free() == 3
        job = create(database, nodes=3, batch_size=24)
        taken = claim(database, job, names[0])
        open_gang(database, taken, nodes=3)
        # The leader is busy, and its two open slots will take two more workers.
        assert free() == 1
        assert take_slot(database, names[1]) is not None
        assert free() == 1  # b follows the gang; one slot is still open
        with database.session() as session:
            count = session.scalar(select(func.count()).select_from(JobSlot))
        assert count == 3
    finally:
        for name in names:
            withdraw(redis_client, name)


def test_a_follower_s_worker_shutting_down_asks_the_whole_group_to_hand_back(
    database: Database,
) -> None:
    job, other = two_nodes(database), create(database)
    taken = claim_next(database, job, "leader", free_nodes=2)
    assert taken is not None
    open_gang(database, taken)
    assert take_slot(database, "follower") is not None
    claim(database, other, "elsewhere")
    with database.session() as session:
        assert runs.request_release(session, worker="follower") == 1
        session.commit()
    with database.session() as session:
        flagged = session.scalars(select(Job.id).where(Job.release_requested.is_(True)))
        assert list(flagged) == [job]
