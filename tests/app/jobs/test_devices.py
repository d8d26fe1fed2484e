"""What the live workers can take now (preemption's capacity), from the presence records
workers write in Redis and the live jobs of each in the database."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import update

from app.db import Database
from app.jobs import devices
from app.jobs.models import Job
from app.queue import training_queue
from tests.app.jobs.helpers import claim, create
from tests.processes import free_port
from worker.presence import announce, withdraw


@pytest.fixture
def presence(redis_client: redis.Redis) -> Iterator[Callable[..., str]]:
    """Announce a worker the way a worker's main process does (worker/presence.py); its
    name, unique to this test (the Postgres database is shared)."""
    names: list[str] = []

    def worker(name: str, *, queues: list[str], **extra: Any) -> str:
        name = f"{name}-{secrets.token_hex(4)}"
        info: dict[str, Any] = {"name": name, "hostname": "test", "pid": 1, "device": "cpu",
                                "cuda_visible_devices": None, "queues": queues,
                                "started_at": "2026-01-01T00:00:00+00:00", **extra}  # fmt: skip
        announce(redis_client, info, ttl_seconds=60)
        names.append(name)
        return name

    yield worker
    for name in names:
        withdraw(redis_client, name)


def test_capacity_counts_the_workers_of_each_queue_with_fewer_live_jobs_than_their_pool(
    database: Database, presence: Callable[..., str], redis_client: redis.Redis
) -> None:
    queue = f"capacity-{secrets.token_hex(4)}"
    pair = training_queue(queue, 2)
    big = presence("big", queues=[queue], concurrency=2)
    both = presence("both", queues=[queue, pair], concurrency=1)
    old = presence("old", queues=[queue])  # a record from before `concurrency`: one slot
    presence("elsewhere", queues=[f"{queue}-other"], concurrency=4)
    claim(database, create(database), big)
    claim(database, create(database, devices=2, batch_size=16), both)
    finished = create(database)
    claim(database, finished, old)
    with database.session() as session:
        # No longer live: its worker's slot is free.
        session.execute(update(Job).where(Job.id == finished).values(status="succeeded"))
        session.commit()

    with database.session() as session:
        capacity = devices.live_capacity(session, redis_client, queue=queue)
    assert capacity is not None
    assert capacity.workers(1) == {big, both, old}
    assert capacity.workers(2) == {both}
    assert capacity.workers(3) == set()
    assert capacity.free_slots(1) == 2  # big runs 1 of 2, old none of 1; both is full
    assert capacity.free_slots(2) == 0


def test_capacity_is_unknown_while_redis_does_not_answer(database: Database) -> None:
    away = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with database.session() as session:
        assert devices.live_capacity(session, away, queue="any") is None
