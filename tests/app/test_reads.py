"""The hot reads (app/reads.py): the same answers on both backends, and a PostgreSQL
connection that was dropped under them costs no request an error."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.db import Database
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
