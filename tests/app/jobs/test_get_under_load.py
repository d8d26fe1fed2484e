"""Reads of a real API process under more requests at once than it has threads (40) and
database connections (30) together: every request is answered, none waits out the
pool's 30 s timeout. A `def` route on a request-scoped session once deadlocked here:
finished routes held their connections while waiting for a thread to validate their
response, and every thread waited for a connection. The job GET reads in one thread
hop; every other route is a `def` route on SessionDep, bounded by its session slots."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx

from app.db import upgrade
from tests.conftest import REDIS_URL
from tests.processes import api_and_worker

CONCURRENT = 150  # > 40 threads + 30 connections
WAVES = 2
SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 8,
        "accumulation_steps": 1, "max_steps": 1}  # fmt: skip


async def get_at_once(base_url: str, path: str) -> list[int]:
    # No connection kept between requests: each request opens its own. Reused, a
    # connection idle since the first wave could be closed by uvicorn (5 s keep-alive)
    # after this client, its event loop busy with 150 requests, had picked it and before
    # it had sent on it: httpx then fails the request (ReadError, or "Server disconnected")
    # rather than retry it, and the test failed now and then on a loaded machine.
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=0)
    # Under the pool's 30 s timeout: a deadlock shows as timeouts, not as slow answers.
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=20) as client:

        async def one() -> int:
            try:
                return (await client.get(path)).status_code
            except httpx.TimeoutException:
                return 0

        codes: list[int] = []
        for _ in range(WAVES):
            codes += await asyncio.gather(*(one() for _ in range(CONCURRENT)))
            if set(codes) != {200}:
                break
        return codes


def test_many_job_gets_at_once_are_all_answered(
    make_postgres_database: Callable[[], str], queue_name: str, tmp_path: Path
) -> None:
    database_url = make_postgres_database()
    upgrade(database_url)
    with api_and_worker(
        tmp_path,
        with_worker=False,
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=queue_name,
        home=str(tmp_path / "home"),
    ) as client:
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
        for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/events"):
            codes = asyncio.run(get_at_once(str(client.base_url), path))
            assert codes.count(200) == len(codes), (path, sorted(set(codes)))
