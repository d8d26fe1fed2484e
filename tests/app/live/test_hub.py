"""The hub reads a job's new events once for all of its streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis
from sqlalchemy import event

from app.db import Database
from app.jobs import runs
from app.live.channels import ring
from app.live.hub import LiveHub
from tests.app.jobs.helpers import claim, create
from tests.conftest import REDIS_URL


def write_steps(database: Database, taken: runs.Claim, steps: range) -> None:
    metrics = [{"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "samples_per_sec": 9.0,
                "micro_batch_size": 8, "time": time.time()} for step in steps]  # fmt: skip
    with database.session() as session:
        runs.record_progress(
            session, claim=taken, job_values={"step": steps[-1]}, metrics=metrics, events=[]
        )
        session.commit()


def test_a_burst_of_rings_for_a_job_200_streams_watch_costs_one_read(
    database: Database,
) -> None:
    # Rings of one job that arrive together (flushes, a cancel, the periodic read) must
    # coalesce into one read, whatever the number of streams, and its batch reach each.
    job_id = create(database)
    taken = claim(database, job_id, "w")
    hub = LiveHub(database, REDIS_URL)  # not started: the test rings it

    async def scenario() -> tuple[int, list[list[int]]]:
        streams = [await hub.subscribe(job_id) for _ in range(200)]
        write_steps(database, taken, range(1, 11))
        queries = 0

        def count(*_: Any) -> None:
            nonlocal queries
            queries += 1

        event.listen(database.engine, "before_cursor_execute", count)
        try:
            for _ in range(10):
                hub.ring(job_id)
            batches = [await asyncio.wait_for(stream.batches.get(), 10) for stream in streams]
        finally:
            event.remove(database.engine, "before_cursor_execute", count)
            await hub.stop()
        assert all(stream.batches.empty() for stream in streams)  # one batch each
        return queries, [[e.data["step"] for e in b if e.type == "metrics"] for b in batches]

    queries, received = asyncio.run(scenario())
    assert queries == 1  # ten rings, 200 streams: one SELECT of the new events
    assert received == [list(range(1, 11))] * 200


def test_rings_of_jobs_nobody_watches_are_dropped_unread(database: Database) -> None:
    watched_id, unwatched_id = create(database), create(database)
    watched_claim = claim(database, watched_id, "w")
    write_steps(database, claim(database, unwatched_id, "w"), range(1, 4))
    hub = LiveHub(database, REDIS_URL, poll_seconds=3600.0)  # rings only
    parameters: list[Any] = []

    def record(_conn: Any, _cursor: Any, _statement: str, params: Any, *_: Any) -> None:
        parameters.append(params)

    async def scenario() -> list[int]:
        stream = await hub.subscribe(watched_id)
        hub.start()
        write_steps(database, watched_claim, range(1, 4))
        event.listen(database.engine, "before_cursor_execute", record)
        rings = redis.Redis.from_url(REDIS_URL)
        try:
            # Until the hub's subscription is up: each ring of the unwatched job comes
            # first, so the watched job's batch arrives after the hub has passed it by.
            while True:
                ring(rings, [unwatched_id])
                ring(rings, [watched_id])
                with contextlib.suppress(TimeoutError):
                    batch = await asyncio.wait_for(stream.batches.get(), 0.1)
                    return [e.data["step"] for e in batch if e.type == "metrics"]
        finally:
            event.remove(database.engine, "before_cursor_execute", record)
            rings.close()
            await hub.stop()

    assert asyncio.run(scenario()) == [1, 2, 3]
    assert parameters and not any(unwatched_id in str(params) for params in parameters)
