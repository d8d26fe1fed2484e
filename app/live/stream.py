"""A job's events as Server-Sent Events: the stored ones after a cursor, then live ones.

The order of operations is what makes a reconnect miss nothing and repeat nothing:
subscribe to the hub first, then read the database after the client's cursor, then
pass on live batches, skipping every id already sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from app.db import Database
from app.jobs.models import Job
from app.jobs.schemas import TERMINAL_STATUSES
from app.live.backlog import sampled_events_after
from app.live.hub import PAGE, LiveEvent, LiveHub, events_after

RETRY_MILLISECONDS = 2000


def format_event(event: LiveEvent) -> str:
    data = json.dumps(event.data, separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def is_terminal(event: LiveEvent) -> bool:
    return event.type == "status" and event.data.get("status") in TERMINAL_STATUSES


def _job_status(database: Database, job_id: str) -> str | None:
    with database.session() as session:
        job = session.get(Job, job_id)
        return job.status if job is not None else None


class _Cursor:
    """What this stream has sent so far."""

    def __init__(self, after: int) -> None:
        self.last = after
        self.finished = False

    def take(self, events: Iterable[LiveEvent]) -> list[str]:
        chunks = []
        for event in events:
            if event.id <= self.last or self.finished:
                continue
            chunks.append(format_event(event))
            self.last = event.id
            self.finished = is_terminal(event)
        return chunks


async def _stored(database: Database, job_id: str, cursor: _Cursor) -> AsyncIterator[str]:
    """Everything stored after the cursor, a page at a time."""
    while not cursor.finished:
        page = await asyncio.to_thread(events_after, database, job_id, cursor.last, PAGE)
        for chunk in cursor.take(page):
            yield chunk
        if len(page) < PAGE:
            return


async def job_event_stream(
    *,
    hub: LiveHub,
    database: Database,
    job_id: str,
    after: int,
    keepalive_seconds: float,
    metrics_backlog: int | None = None,
) -> AsyncIterator[str]:
    """`metrics_backlog`: at most that many of the stored metrics events, evenly spread,
    the newest exact (app/live/backlog.py); None: every stored event."""
    subscription = await hub.subscribe(job_id)
    try:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        # Read before the backlog: a job finished now has its terminal event stored.
        finished_before = await asyncio.to_thread(_job_status, database, job_id)
        cursor = _Cursor(after)
        if metrics_backlog is not None:
            sampled = await asyncio.to_thread(
                sampled_events_after, database, job_id, cursor.last, metrics_backlog
            )
            for chunk in cursor.take(sampled or ()):
                yield chunk
        async for chunk in _stored(database, job_id, cursor):
            yield chunk
        if finished_before in TERMINAL_STATUSES:
            return  # the cursor was past the terminal event: nothing more will come
        while not cursor.finished:
            if subscription.lagging:  # batches were dropped: catch up from the database
                subscription.lagging = False
                async for chunk in _stored(database, job_id, cursor):
                    yield chunk
                continue
            try:
                batch = await asyncio.wait_for(subscription.batches.get(), keepalive_seconds)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            for chunk in cursor.take(batch):
                yield chunk
    finally:
        hub.unsubscribe(subscription)


def parse_last_event_id(value: Any) -> int | None:
    """The Last-Event-ID header: an event id, or None when absent or not a number."""
    if value is None:
        return None
    text = str(value).strip()
    # isdigit() alone passes "²" and 5,000 digits, both of which int() refuses, and ids
    # past a 64-bit column, which the database refuses.
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    number = int(text)
    return number if number < 2**63 else None
