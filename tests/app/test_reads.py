"""The hot reads (app/reads.py): the same answers on both backends, and a PostgreSQL
connection that was dropped under them costs no request an error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.db import Database
from app.jobs.service import JOBS
from app.reads import PostgresReads, ThreadedReads, open_reads
from tests.app.jobs.helpers import create


def test_postgres_reads_run_on_the_async_driver_and_sqlite_on_the_engine(
    database: Database,
) -> None:
    async def kind() -> type:
        reads = await open_reads(database)
        await reads.close()
        return type(reads)

    expected = PostgresReads if database.engine.dialect.name == "postgresql" else ThreadedReads
    assert asyncio.run(kind()) is expected


def test_a_job_get_after_postgres_dropped_the_reads_connections_answers(
    client: TestClient, database: Database
) -> None:
    if database.engine.dialect.name != "postgresql":
        pytest.skip("the async pool exists on PostgreSQL only")
    job_id = create(database)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # the pool has a connection
    reads: PostgresReads = client.app.state.reads  # type: ignore[attr-defined]
    assert client.portal is not None
    backends = client.portal.call(_backend_pids, reads)
    assert backends
    with psycopg.connect(_libpq(database.url), autocommit=True) as admin:
        for pid in backends:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    answers = [client.get(f"/v1/jobs/{job_id}") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert all(answer.json()["id"] == job_id for answer in answers)


async def _backend_pids(reads: PostgresReads) -> list[int]:
    # Take every idle connection at once (each backend seen once): two or more die here.
    held = [await reads.pool.getconn() for _ in range(reads.pool.get_stats()["pool_available"])]
    pids = [connection.info.backend_pid for connection in held]
    for connection in held:
        await reads.pool.putconn(connection)
    return pids


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class _HeldReads(PostgresReads):
    """PostgresReads whose queries wait until the test lets each one go, and answer rows
    for the ids asked (`missing` ones excepted)."""

    def __init__(self) -> None:
        super().__init__("postgresql+psycopg://nobody@127.0.0.1:1/none")  # never opened
        self.sent: list[list[str]] = []
        self.go = asyncio.Queue[Exception | None]()
        self.missing = {"j_missing"}

    async def all(self, statement: Any, params: Mapping[str, Any]) -> Sequence[Any]:
        self.sent.append(list(params["ids"]))
        failure = await self.go.get()
        if failure is not None:
            raise failure
        return [SimpleNamespace(id=i) for i in params["ids"] if i not in self.missing]


def test_lookups_that_arrive_while_one_is_out_go_together_in_the_next_query() -> None:
    async def scenario() -> None:
        reads = _HeldReads()
        first = asyncio.create_task(reads.by_id(JOBS, "j_a"))
        await _until(lambda: len(reads.sent) == 1)
        # Asked while the first query is out: not answered by it (it may predate a
        # write made before they were asked), but by the next one, together.
        later = [asyncio.create_task(reads.by_id(JOBS, i)) for i in ("j_b", "j_c", "j_b")]
        await asyncio.sleep(0)
        assert reads.sent == [["j_a"]]
        reads.go.put_nowait(None)
        assert (await first).id == "j_a"
        await _until(lambda: len(reads.sent) == 2)
        assert reads.sent[1] == ["j_b", "j_c"]
        reads.go.put_nowait(None)
        assert [(await task).id for task in later] == ["j_b", "j_c", "j_b"]

    asyncio.run(scenario())


def test_a_failed_query_fails_its_lookups_only_and_an_unknown_id_is_none() -> None:
    async def scenario() -> None:
        reads = _HeldReads()
        failing = asyncio.create_task(reads.by_id(JOBS, "j_a"))
        await _until(lambda: len(reads.sent) == 1)
        gone = asyncio.create_task(reads.by_id(JOBS, "j_b"))  # its client hangs up
        next_ones = asyncio.create_task(reads.by_id(JOBS, "j_missing"))
        await asyncio.sleep(0)
        gone.cancel()
        reads.go.put_nowait(RuntimeError("the database is gone"))
        with pytest.raises(RuntimeError, match="the database is gone"):
            await failing
        reads.go.put_nowait(None)
        assert await next_ones is None
        assert reads.sent == [["j_a"], ["j_b", "j_missing"]]

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)
