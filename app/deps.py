"""Request dependencies as Annotated aliases.

They are `async def`: FastAPI runs a plain `def` dependency in the thread pool, and
those hops cost the job GET and the list 7 % of their throughput (bench/api.py). Only
giving a session's connection back, which is I/O, still goes to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
import redis
from celery import Celery
from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from app.db import Database, max_connections
from app.jobs.reaper import Reaper
from app.reads import Reads
from app.settings import Settings


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency on what the lifespan keeps in `app.state.<name>`."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    return dependency


# Threads of the routes (anyio's default limiter) that must stay free of database waits:
# a `def` route's response is validated in another thread hop while its session still
# holds a connection. Were every thread waiting for a connection, held by routes waiting
# for a thread, nothing would move until the pool's 30 s timeout (bench/api.py found it).
THREADS_KEPT_FREE = 16
# Connections left to the hub, the reaper and streamed downloads, which use their own.
CONNECTIONS_KEPT_FREE = 5


def session_slots(database: Database) -> anyio.Semaphore:
    """How many request sessions may be open at once; the others wait in the event loop,
    holding no thread, until one closes."""
    threads = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    connections = max_connections(database.engine) - CONNECTIONS_KEPT_FREE
    return anyio.Semaphore(max(1, min(threads - THREADS_KEPT_FREE, connections)))


async def _session(request: Request) -> AsyncIterator[Session]:
    # Opening a session is free: it connects at its first query, in the route's thread.
    # Its exit runs once the route has returned and its response is built, before the
    # response is sent (SessionDep's scope="function"): a response that lasts (an event
    # stream, a download) holds neither a slot nor a connection while it is sent.
    database: Database = request.app.state.database
    async with request.app.state.session_slots:
        session = database.sessions()
        try:
            yield session
        finally:
            if session.in_transaction():  # it holds a connection: the rollback is I/O
                # Not on the routes' thread limiter, as FastAPI exits `def` dependencies.
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
            else:
                session.close()


# scope="function": with the default ("request") the session closed after the response's
# last byte, so every stream and download held a slot for its whole life, and a dozen
# event streams left no slot to the short routes.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(_state("settings"))]
DatabaseDep = Annotated[Database, Depends(_state("database"))]
ReadsDep = Annotated[Reads, Depends(_state("reads"))]
CeleryDep = Annotated[Celery, Depends(_state("celery"))]
RedisDep = Annotated[redis.Redis, Depends(_state("redis"))]
ReaperDep = Annotated[Reaper | None, Depends(_state("reaper"))]  # None: this API runs none

# Query parameters of the paged lists. Cursors are bounded by their columns: past them a
# request is a 422, not a database error.
MAX_INT32 = 2**31 - 1  # steps, attempt numbers
Limit = Annotated[int, Query(ge=1, le=100, description="page size, 1..100")]
StepCursor = Annotated[int | None, Query(ge=0, le=MAX_INT32)]
StepsLimit = Annotated[int, Query(ge=1, le=1000)]
