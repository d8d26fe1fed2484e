"""The per-tenant cap against a real API process: concurrent submits at cap − 1 let
exactly one job in. Counted, then inserted, 50 submits at once all saw the same free
place and several of them took it."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.db import upgrade
from tests.conftest import REDIS_URL
from tests.processes import api_and_worker

CAP = 3
CONCURRENT = 50
SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 8,
        "accumulation_steps": 1, "max_steps": 1}  # fmt: skip


def submit_at_once(base_url: str) -> list[int]:
    """Every request on a connection opened beforehand, then all sent within a moment:
    the server has them all before it answers the first (one client sending them one
    by one over fresh connections let the server answer each before the next came)."""
    url = httpx.URL(base_url)
    body = json.dumps(SPEC).encode()
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    sockets = [
        socket.create_connection((url.host, url.port), timeout=60) for _ in range(CONCURRENT)
    ]
    try:
        for sock in sockets:
            sock.sendall(request)
        return [status_of(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def status_of(sock: socket.socket) -> int:
    with sock.makefile("rb") as answer:
        return int(answer.readline().split()[1])


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_submits_at_cap_minus_one_let_exactly_one_in(
    make_postgres_database: Callable[[], str], queue_name: str, tmp_path: Path, backend: str
) -> None:
    database_url = (
        make_postgres_database() if backend == "postgres" else f"sqlite:///{tmp_path / 'cap.db'}"
    )
    upgrade(database_url)
    with api_and_worker(
        tmp_path,
        with_worker=False,  # the jobs stay queued: active for the cap
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-cap",
        home=str(tmp_path / "home"),
        max_active_jobs_per_tenant=str(CAP),
    ) as client:
        for _ in range(CAP - 1):
            assert client.post("/v1/jobs", json=SPEC).status_code == 201
        codes = Counter(submit_at_once(str(client.base_url)))
        assert codes == {201: 1, 429: CONCURRENT - 1}, codes
        listed = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()
        assert len(listed["data"]) == CAP
