"""A job's events as Server-Sent Events: the stored ones after a cursor, then live ones.

FastAPI's `EventSourceResponse` does the framing, the headers and the OpenAPI entry of
the routes that yield these. Its own keep-alive pings every 15 s for every app of the
process; the stream sends its own at the app's `stream_keepalive_seconds` instead.

The order of operations is what makes a reconnect miss nothing and repeat nothing:
subscribe to the hub first, then read the database after the client's cursor, then
pass on live batches, skipping every id already sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Scope

from app.db import Database
from app.jobs.schemas import TERMINAL_STATUSES
from app.live.backlog import sampled_events_after
from app.live.hub import PAGE, LiveEvent, LiveHub, events_after

RETRY_MILLISECONDS = 2000
KEEP_ALIVE = ServerSentEvent(comment="keep-alive")


class EventStreamResponse(EventSourceResponse):
    """The stream's error answers are JSON envelopes, not events; FastAPI documents them
    in the media type of the response class, so this one leaves it unset. (The stream
    itself is sent as text/event-stream all the same.)"""

    media_type = None  # type: ignore[assignment]


class AcceptsEventStream(APIRoute):
    """Matches only requests that accept `text/event-stream`: the others go on to the
    next route of the same path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if "text/event-stream" not in Headers(scope=scope).get("accept", ""):
            return Match.NONE, {}
        return super().matches(scope)


class _Cursor:
    """What this stream has sent so far."""

    def __init__(self, after: int) -> None:
        self.last = after
        self.finished = False

    def take(self, events: Iterable[LiveEvent]) -> list[ServerSentEvent]:
        taken = []
        for event in events:
            if event.id <= self.last or self.finished:
                continue
            taken.append(event.sse)
            self.last = event.id
            self.finished = event.type == "status" and event.data.get("status") in TERMINAL_STATUSES
        return taken


async def _stored(
    database: Database, job_id: str, cursor: _Cursor
) -> AsyncIterator[ServerSentEvent]:
    """Everything stored after the cursor, a page at a time."""
    while not cursor.finished:
        page = await asyncio.to_thread(events_after, database, job_id, cursor.last, PAGE)
        for sse in cursor.take(page):
            yield sse
        if len(page) < PAGE:
            return


async def job_event_stream(
    *,
    hub: LiveHub,
    database: Database,
    job_id: str,
    finished_before: bool,
    after: int,
    keepalive_seconds: float,
    metrics_backlog: int | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """`finished_before`: the job had finished when the stream was asked for (so its
    terminal event is stored). `metrics_backlog`: at most that many of the stored metrics
    events, evenly spread, the newest exact (app/live/backlog.py); None: every one."""
    subscription = await hub.subscribe(job_id)
    try:
        yield ServerSentEvent(retry=RETRY_MILLISECONDS)
        cursor = _Cursor(after)
        if metrics_backlog is not None:
            sampled = await asyncio.to_thread(
                sampled_events_after, database, job_id, cursor.last, metrics_backlog
            )
            for sse in cursor.take(sampled or ()):
                yield sse
        async for sse in _stored(database, job_id, cursor):
            yield sse
        if finished_before:
            return  # the cursor was past the terminal event: nothing more will come
        while not cursor.finished:
            if subscription.lagging:  # batches were dropped: catch up from the database
                subscription.lagging = False
                async for sse in _stored(database, job_id, cursor):
                    yield sse
                continue
            try:
                batch = await asyncio.wait_for(subscription.batches.get(), keepalive_seconds)
            except TimeoutError:
                yield KEEP_ALIVE
                continue
            for sse in cursor.take(batch):
                yield sse
    finally:
        hub.unsubscribe(subscription)


def parse_last_event_id(value: Any) -> int | None:
    """The Last-Event-ID header: an event id, or None when absent or not a number."""
    text = str(value).strip()  # None: "None", no number
    # isdigit() alone passes "²" and 5,000 digits, both of which int() refuses, and ids
    # past a 64-bit column, which the database refuses.
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    number = int(text)
    return number if number < 2**63 else None
