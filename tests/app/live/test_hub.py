"""The hub reads a job's new events once for all of its streams."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event

from app.db import Database
from app.jobs import runs
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


def test_many_streams_of_one_job_cost_one_read_per_flush(database: Database) -> None:
    job_id = create(database)
    taken = claim(database, job_id, "w")
    hub = LiveHub(database, REDIS_URL)
    heard: list[dict[str, Any]] = []
    hub.add_listener(lambda _, e: heard.append(e))

    async def scenario() -> tuple[int, list[list[int]]]:
        streams = [await hub.subscribe(job_id) for _ in range(200)]
        write_steps(database, taken, range(1, 11))
        queries = 0

        def count(*_: Any) -> None:
            nonlocal queries
            queries += 1

        event.listen(database.engine, "before_cursor_execute", count)
        try:
            await hub.refresh(job_id)
        finally:
            event.remove(database.engine, "before_cursor_execute", count)
        received = []
        for stream in streams:
            batch = stream.batches.get_nowait()
            received.append([e.data["step"] for e in batch if e.type == "metrics"])
        return queries, received

    queries, received = asyncio.run(scenario())
    assert queries == 1  # one SELECT of the new events, whatever the number of streams
    assert all(steps == list(range(1, 11)) for steps in received)
    assert [e["data"]["step"] for e in heard] == list(range(1, 11))  # listeners once each


def test_a_burst_of_rings_for_one_job_costs_one_read(database: Database) -> None:
    # A worker's flush rings once per event it wrote, all at once; the hub's listener
    # starts one refresh per ring. They must coalesce into one read, not one each.
    job_id = create(database)
    taken = claim(database, job_id, "w")
    hub = LiveHub(database, REDIS_URL)

    async def scenario() -> tuple[int, list[list[list[int]]]]:
        streams = [await hub.subscribe(job_id) for _ in range(3)]
        write_steps(database, taken, range(1, 11))
        queries = 0

        def count(*_: Any) -> None:
            nonlocal queries
            queries += 1

        event.listen(database.engine, "before_cursor_execute", count)
        try:
            await asyncio.gather(*(hub.refresh(job_id) for _ in range(10)))
        finally:
            event.remove(database.engine, "before_cursor_execute", count)
        received = []
        for stream in streams:
            batches = []
            while not stream.batches.empty():
                batch = stream.batches.get_nowait()
                batches.append([e.data["step"] for e in batch if e.type == "metrics"])
            received.append(batches)
        return queries, received

    queries, received = asyncio.run(scenario())
    assert queries == 1  # ten rings, one SELECT of the new events
    assert received == [[list(range(1, 11))]] * 3  # each stream: one batch, every step once
