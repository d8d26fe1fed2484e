"""Long responses hold nothing that short requests need (`app/deps.py`: a request's
session closes when its route has answered, before the response is sent).

Real API processes, on SQLite and PostgreSQL. 40 event streams, 33 large downloads
whose clients have stopped reading (each more than the API's database connections: 30
on PostgreSQL, 15 on SQLite) and an upload whose client sends slowly are all in flight
while the short routes (list, submit, cancel, the dashboard) answer in under a second
each. Before, every stream,
download and upload held its request's session slot (and most a connection) until its
last byte: a dozen streams froze every short route on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from app.blobs import DatabaseStore
from app.checkpoints import service as checkpoints_service
from app.db import Database, upgrade
from app.jobs import runs
from tests.app.files.stored_files import add_file
from tests.app.files.uploads import CONTENT_TYPE, multipart
from tests.conftest import REDIS_URL
from tests.processes import api_and_worker

MIB = 1024 * 1024
STREAMS = 40  # more than the API's database connections: 30 on PostgreSQL, 15 on SQLite
DOWNLOADS = 32  # paused downloads of one file: more than those connections too
MANY_STREAMS = 200
LARGE_BYTES = 16 * MIB  # far more than two sockets buffer: the server waits on the reader
SHORT_ROUTE_SECONDS = 1.0
# Client timeouts: a route that waits for a long response to end shows as a timeout
# within seconds, not as the test hanging until the streams close.
SHORT_TIMEOUT = httpx.Timeout(5.0)
LONG_TIMEOUT = httpx.Timeout(20.0)
SETTLE_SECONDS = 20.0
SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 8,
        "accumulation_steps": 1, "max_steps": 1}  # fmt: skip


@contextmanager
def api_on(database_url: str, tmp_path: Path, queue: str) -> Iterator[httpx.Client]:
    """An API process (no worker: queued jobs stay queued, their streams stay open)."""
    with api_and_worker(
        tmp_path,
        with_worker=False,
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=queue,
        home=str(tmp_path / "home"),
        reaper_interval_seconds="0",  # the job the test claims stays as it left it
        stream_keepalive_seconds="0.5",
    ) as client:
        yield client


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, make_postgres_database: Callable[[], str]
) -> str:
    url = (
        make_postgres_database()
        if request.param == "postgres"
        else f"sqlite:///{tmp_path / 'trainjob.db'}"
    )
    upgrade(url)
    return url


class Watcher:
    """What one event stream has received."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.keepalives = 0
        self.backlog = asyncio.Event()  # the stored `queued` status arrived


async def watch(client: httpx.AsyncClient, job_id: str, watcher: Watcher) -> None:
    """Follow the job's event stream until the server ends it (after a terminal status)."""
    headers = {"accept": "text/event-stream"}
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith(": keep-alive"):
                watcher.keepalives += 1
            elif line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "status":
                watcher.statuses.append(json.loads(line.removeprefix("data: "))["status"])
                watcher.backlog.set()


async def start_watchers(
    client: httpx.AsyncClient, job_id: str, count: int
) -> tuple[list[Watcher], list[asyncio.Task[None]]]:
    """`count` streams of the job; returns once each has its backlog or SETTLE_SECONDS
    have passed (the caller counts them)."""
    watchers = [Watcher() for _ in range(count)]
    tasks = [asyncio.create_task(watch(client, job_id, watcher)) for watcher in watchers]
    waits = [asyncio.create_task(w.backlog.wait()) for w in watchers]
    await asyncio.wait(waits, timeout=SETTLE_SECONDS)
    for wait in waits:
        wait.cancel()
    return watchers, tasks


async def paused_download(
    stack: AsyncExitStack, client: httpx.AsyncClient, path: str
) -> AsyncIterator[bytes]:
    """A download whose first piece has been read, then no more until the caller reads on."""
    try:
        response = await stack.enter_async_context(client.stream("GET", path))
        assert response.status_code == 200, await response.aread()
        pieces = response.aiter_raw()
        first = await anext(pieces)
    except httpx.TimeoutException as error:
        raise AssertionError(f"{path} sent nothing while other downloads paused") from error

    async def all_pieces() -> AsyncIterator[bytes]:
        yield first
        async for piece in pieces:
            yield piece

    return all_pieces()


async def slow_upload(
    client: httpx.AsyncClient, started: asyncio.Event, release: asyncio.Event
) -> httpx.Response:
    """Upload a small file whose second half is sent only once `release` is set."""
    head, tail = multipart("slow.jsonl", [])  # the envelope alone

    async def body() -> AsyncIterator[bytes]:
        yield head
        yield b'{"text": "sent at once"}\n' * 1000
        started.set()  # what came before is in the socket
        await release.wait()
        yield b'{"text": "sent later"}\n' * 1000
        yield tail

    return await client.post("/v1/files", content=body(), headers={"content-type": CONTENT_TYPE})


async def timed(
    client: httpx.AsyncClient, method: str, path: str, **options: object
) -> tuple[httpx.Response | None, float]:
    """The response (None on a timeout) and how long it took."""
    start = time.perf_counter()
    try:
        response = await client.request(method, path, timeout=SHORT_TIMEOUT, **options)  # type: ignore[arg-type]
    except httpx.TimeoutException:
        response = None
    return response, time.perf_counter() - start


async def short_routes(client: httpx.AsyncClient) -> dict[str, tuple[int, float]]:
    """List, submit, cancel, dashboard, one after the other: status code (0: timed out)
    and seconds, by route."""
    answers: dict[str, tuple[int, float]] = {}

    def note(name: str, response: httpx.Response | None, seconds: float) -> None:
        answers[name] = (response.status_code if response is not None else 0, round(seconds, 2))

    response, seconds = await timed(client, "GET", "/v1/jobs")
    note("list", response, seconds)
    response, seconds = await timed(client, "POST", "/v1/jobs", json=SPEC)
    note("submit", response, seconds)
    if response is not None and response.status_code == 201:
        job_id = response.json()["id"]
        response, seconds = await timed(client, "POST", f"/v1/jobs/{job_id}/cancel")
        note("cancel", response, seconds)
    response, seconds = await timed(client, "GET", "/v1/dashboard")
    note("dashboard", response, seconds)
    return answers


def all_quick(answers: dict[str, tuple[int, float]], expected: dict[str, int]) -> bool:
    codes = {name: code for name, (code, _) in answers.items()}
    return codes == expected and all(s < SHORT_ROUTE_SECONDS for _, s in answers.values())


def seed_downloads(database_url: str, job_id: str) -> str:
    """A large checkpoint of `job_id` (claimed for it) and a large file; the file's id."""
    database = Database(database_url)
    try:
        with database.session() as session:
            claim = runs.claim_job(session, job_id=job_id, worker="test", lease_timeout=3600)
            assert claim is not None
            checkpoints_service.save_checkpoint(
                session, claim=claim, store=DatabaseStore(), step=1,
                weights=os.urandom(LARGE_BYTES), state=b"state", loss=1.0,
            )  # fmt: skip
            session.commit()
        # Small chunks: each paused download holds one in the API process.
        content = os.urandom(LARGE_BYTES)
        return add_file(database, status="valid", content=content, chunk_bytes=MIB // 4)
    finally:
        database.dispose()


async def served_alongside_long_responses(
    base_url: str, watched_job: str, trained_job: str, file_id: str
) -> None:
    limits = httpx.Limits(max_connections=STREAMS + DOWNLOADS + 10, max_keepalive_connections=0)
    long_clients = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=LONG_TIMEOUT)
    async with long_clients as long, httpx.AsyncClient(base_url=base_url) as short:
        started, release = asyncio.Event(), asyncio.Event()
        upload = asyncio.create_task(slow_upload(long, started, release))
        await asyncio.wait_for(started.wait(), SETTLE_SECONDS)
        async with AsyncExitStack() as stack:
            weights = await paused_download(stack, long, f"/v1/jobs/{trained_job}/weights")
            contents = [
                await paused_download(stack, long, f"/v1/files/{file_id}/content")
                for _ in range(DOWNLOADS)
            ]
            watchers, streams = await start_watchers(long, watched_job, STREAMS)
            served = sum(w.backlog.is_set() for w in watchers)

            answers = await short_routes(short)

            expected = {"list": 200, "submit": 201, "cancel": 200, "dashboard": 200}
            assert served == STREAMS and all_quick(answers, expected), (
                f"{served} of {STREAMS} streams got their backlog; "
                f"short routes (status, seconds): {answers}"
            )
            # The long responses were only waiting: each goes on to its end.
            release.set()
            assert (await asyncio.wait_for(upload, SETTLE_SECONDS)).status_code == 201
            for pieces in (weights, contents[0]):  # the others close unread
                assert sum([len(piece) async for piece in pieces]) == LARGE_BYTES
            cancelled = await short.post(f"/v1/jobs/{watched_job}/cancel")
            assert cancelled.status_code == 200
            await asyncio.wait_for(asyncio.gather(*streams), SETTLE_SECONDS)
            assert {tuple(w.statuses) for w in watchers} == {("queued", "cancelled")}


def test_short_routes_answer_while_streams_downloads_and_an_upload_are_in_flight(
    database_url: str, tmp_path: Path, queue_name: str
) -> None:
    with api_on(database_url, tmp_path, queue_name) as client:
        watched_job = client.post("/v1/jobs", json=SPEC).json()["id"]
        trained_job = client.post("/v1/jobs", json=SPEC).json()["id"]
        file_id = seed_downloads(database_url, trained_job)
        asyncio.run(
            served_alongside_long_responses(str(client.base_url), watched_job, trained_job, file_id)
        )


async def many_streams_served(base_url: str, job_id: str) -> None:
    limits = httpx.Limits(max_connections=MANY_STREAMS + 10, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=base_url, limits=limits, timeout=LONG_TIMEOUT) as long,
        httpx.AsyncClient(base_url=base_url) as short,
    ):
        watchers, streams = await start_watchers(long, job_id, MANY_STREAMS)
        served = sum(w.backlog.is_set() for w in watchers)
        assert served == MANY_STREAMS, f"{served} of {MANY_STREAMS} streams got their backlog"
        keepalives = [w.keepalives for w in watchers]

        def all_kept_alive() -> bool:
            pairs = zip(watchers, keepalives, strict=True)
            return all(watcher.keepalives > before for watcher, before in pairs)

        deadline = time.monotonic() + SETTLE_SECONDS
        while not all_kept_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert all_kept_alive(), "an idle stream sent no keep-alive"
        response, seconds = await timed(short, "GET", "/v1/jobs")
        assert response is not None and response.status_code == 200
        assert seconds < SHORT_ROUTE_SECONDS, seconds
        assert (await short.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
        await asyncio.wait_for(asyncio.gather(*streams), SETTLE_SECONDS)
        assert {tuple(w.statuses) for w in watchers} == {("queued", "cancelled")}


def test_two_hundred_streams_on_postgres_are_all_served_live(
    make_postgres_database: Callable[[], str], tmp_path: Path, queue_name: str
) -> None:
    database_url = make_postgres_database()
    upgrade(database_url)
    with api_on(database_url, tmp_path, queue_name) as client:
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
        asyncio.run(many_streams_served(str(client.base_url), job_id))
