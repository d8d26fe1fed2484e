"""The claim order (priority, aging, fair share, age), quotas and preemption, on both
databases, through the scheduling queries a worker and the reaper run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from app.db import Database, upgrade, utcnow
from app.jobs import runs, scheduling
from app.jobs.models import Job, JobAttempt
from app.tenants.models import Tenant
from tests.app.jobs.helpers import LEASE, claim, create, last_event, load

POLICY = scheduling.Policy(aging_seconds=60.0, fair_share_window_seconds=3600.0)


@pytest.fixture(params=["postgres", "sqlite"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, make_postgres_database: Callable[[], str]
) -> Iterator[Database]:
    """A database of its own per test: the claim takes the best job of the whole table, so
    another test's queued jobs (the session's shared PostgreSQL database) would compete."""
    url = make_postgres_database() if request.param == "postgres" else f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


def claim_next(database: Database, hint: str, worker: str = "w") -> str | None:
    with database.session() as session:
        taken = scheduling.claim_next(
            session, hint=hint, worker=worker, lease_timeout=LEASE, policy=POLICY
        )
        session.commit()
    return None if taken is None else taken.job_id


def set_job(database: Database, job_id: str, **values: object) -> None:
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def create_for(database: Database, tenant: str, **changes: object) -> str:
    job_id = create(database, **changes)
    set_job(database, job_id, tenant=tenant)
    return job_id


def test_the_highest_priority_runs_first_whatever_message_woke_the_worker(
    database: Database,
) -> None:
    low, high, middle = (create(database, priority=p) for p in (100, 900, 500))
    assert claim_next(database, low) == high
    assert claim_next(database, high) == middle
    assert claim_next(database, middle) == low
    assert claim_next(database, middle) is None  # nothing left: the message does nothing


def test_a_job_waiting_long_enough_overtakes_a_higher_priority(database: Database) -> None:
    old = create(database, priority=100)
    new = create(database, priority=200)
    # 101 aging periods: 100 + 101 > 200.
    set_job(database, old, queued_at=utcnow() - timedelta(seconds=60 * 101 + 1))
    assert claim_next(database, new) == old


def test_within_a_priority_the_tenant_that_used_less_goes_first(database: Database) -> None:
    busy = create_for(database, "a")
    claim(database, busy, "w0")  # tenant a has a run going: it is using devices
    with database.session() as session:
        session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == busy)
            .values(started_at=utcnow() - timedelta(seconds=600))
        )
        session.commit()
    first_a = create_for(database, "a")
    later_b = create_for(database, "b")
    assert claim_next(database, first_a) == later_b
    assert claim_next(database, first_a) == first_a


def test_a_larger_share_lets_a_tenant_use_more_before_others_go_first(
    database: Database,
) -> None:
    for tenant, share, seconds in (("a", 4.0, 600), ("b", 1.0, 300)):
        done = create_for(database, tenant)
        claim(database, done, f"w-{tenant}")
        with database.session() as session:
            session.execute(
                update(JobAttempt)
                .where(JobAttempt.job_id == done)
                .values(
                    started_at=utcnow() - timedelta(seconds=seconds + 10),
                    ended_at=utcnow() - timedelta(seconds=10),
                )
            )
            session.add(Tenant(name=tenant, share=share))
            session.commit()
    b = create_for(database, "b")
    a = create_for(database, "a")
    # a used 600 device-seconds at share 4 (150 each), b 300 at share 1.
    assert claim_next(database, b) == a


def test_a_running_devices_quota_holds_a_job_back_with_one_warning(database: Database) -> None:
    with database.session() as session:
        session.add(Tenant(name="q", max_running_devices=1))
        session.commit()
    running = create_for(database, "q")
    claim(database, running, "w0")
    held = create_for(database, "q", priority=900)
    other = create_for(database, "r", priority=100)
    assert claim_next(database, held) == other
    for _ in range(2):
        with database.session() as session:
            holds = scheduling.hold_blocked_jobs(session, now=utcnow())
            session.commit()
        assert holds.held == ([held] if _ == 0 else []) and holds.released == []
    kind, data = last_event(database, held)
    assert kind == "warning" and data["quota"] == "max_running_devices"
    set_job(database, running, status="succeeded")
    with database.session() as session:
        assert scheduling.hold_blocked_jobs(session, now=utcnow()).released == [held]
        session.commit()
    assert load(database, held).held_by is None
    assert claim_next(database, held) == held


def test_queue_position_counts_the_jobs_that_would_run_first(database: Database) -> None:
    jobs = [create(database, priority=p) for p in (100, 900, 500)]
    with database.session() as session:
        positions = [
            scheduling.queue_position(
                session, job_id=job_id, devices=1, now=utcnow(), policy=POLICY
            )
            for job_id in jobs
        ]
    assert positions == [2, 0, 1]


def capacity(free: int, workers: set[str]) -> scheduling.Capacity:
    return scheduling.Capacity(workers=lambda devices: workers, free_slots=lambda devices: free)


def preempt(database: Database, free: int, workers: set[str], min_run: float = 0.0) -> list:
    with database.session() as session:
        chosen = scheduling.preempt_for_waiting(
            session,
            now=utcnow(),
            policy=POLICY,
            capacity=capacity(free, workers),
            gap=100,
            min_run_seconds=min_run,
        )
        session.commit()
    return chosen


def test_a_much_higher_priority_job_preempts_the_lowest_running_one(database: Database) -> None:
    low, mid = create(database, priority=100), create(database, priority=300)
    claim(database, low, "w0")
    claim(database, mid, "w1")
    urgent = create(database, priority=350)
    assert preempt(database, free=1, workers={"w0", "w1"}) == []  # a worker is free
    assert preempt(database, free=0, workers={"w0", "w1"}) == [(low, urgent)]
    assert load(database, low).release_requested
    assert preempt(database, free=0, workers={"w0", "w1"}) == []  # one is under way
    # The victim's hand-back: back in the queue, a `preempted` status, not counted.
    with database.session() as session:
        job = session.get(Job, low)
        assert job is not None
        taken = runs.Claim(low, job.lease, job.attempts, 0, 0.0)
        assert runs.hand_back(session, claim=taken, reason="shutdown", counted=False)
        session.commit()
    job = load(database, low)
    assert (job.status, job.attempts) == ("queued", 0)
    assert last_event(database, low) == ("status", {"status": "queued", "reason": "preempted"})


def test_no_preemption_below_the_gap_of_a_young_run_or_an_opted_out_job(
    database: Database,
) -> None:
    low = create(database, priority=100)
    claim(database, low, "w0")
    create(database, priority=199)
    assert preempt(database, free=0, workers={"w0"}) == []
    create(database, priority=900)
    assert preempt(database, free=0, workers={"w0"}, min_run=300) == []
    set_job(database, low, preemptible=False)
    assert preempt(database, free=0, workers={"w0"}) == []
    assert preempt(database, free=0, workers={"w9"}) == []  # no such worker: frees nothing
