"""One Redis subscription per API process, fanned out to every event stream it serves.

Redis pub/sub is only a doorbell here: "job X has new events", rung once per commit.
The hub follows only the jobs its streams watch and drops the other rings unread. A
watched job has a reader task: on a ring (or a burst of them) it reads the job's new
events from the database once, after the last id it has handed out, and gives the
batch to every stream of the job. A thousand viewers of one job cost one query per
flush of its worker, not a thousand. Pub/sub delivers at most once, so the hub also
rings every watched job itself every `poll_seconds`, and after a reconnect.

Why reading "after the last id" misses nothing: every writer of a job's events first
updates the job's row in the same transaction, so the row lock orders the writers of
one job and their event ids rise in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis
from fastapi.sse import ServerSentEvent
from sqlalchemy import func, select

from app.db import Database
from app.jobs.models import JobEvent
from app.live.channels import CHANNEL_PREFIX

logger = logging.getLogger(__name__)

PAGE = 1000
STOP_SECONDS = 5.0
# Batches a stream may have waiting before it is told to catch up from the database.
STREAM_BACKLOG = 256


@dataclass(frozen=True)
class LiveEvent:
    id: int
    type: str
    data: dict[str, Any]

    @cached_property
    def sse(self) -> ServerSentEvent:
        """The event as the streams send it: built once for all of them. Our JSON, compact,
        as `raw_data`: FastAPI would encode the dict again for every stream."""
        data = json.dumps(self.data, separators=(",", ":"), default=str)
        return ServerSentEvent(id=str(self.id), event=self.type, raw_data=data)


def events_after(database: Database, job_id: str, after: int, limit: int = PAGE) -> list[LiveEvent]:
    """The job's events with an id above `after`, oldest first (a page)."""
    with database.session() as session:
        rows = session.execute(
            select(JobEvent.id, JobEvent.type, JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit)
        ).all()
    return [LiveEvent(row.id, row.type, row.data) for row in rows]


def last_event_id(database: Database, job_id: str) -> int:
    with database.session() as session:
        return session.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id)) or 0


@dataclass(eq=False)
class Subscription:
    """One stream's view of a job: batches of new events, or a note to catch up."""

    job_id: str
    batches: asyncio.Queue[Sequence[LiveEvent]] = field(
        default_factory=lambda: asyncio.Queue(STREAM_BACKLOG)
    )
    # Set when the stream fell behind and batches were dropped: it re-reads the database.
    lagging: bool = False


@dataclass(eq=False)
class _Watched:
    cursor: int
    subscriptions: set[Subscription] = field(default_factory=set)
    # Set by rings and the periodic read: however many came, the reader reads once.
    rung: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None


class LiveHub:
    def __init__(self, database: Database, redis_url: str, *, poll_seconds: float = 5.0) -> None:
        self.database = database
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self._watched: dict[str, _Watched] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ---- streams

    async def subscribe(self, job_id: str) -> Subscription:
        """Register a stream; anything committed after this returns reaches it."""
        subscription = Subscription(job_id)
        watched = self._watched.get(job_id)
        if watched is None:
            cursor = await asyncio.to_thread(last_event_id, self.database, job_id)
            watched = self._watched.get(job_id)  # another stream may have come meanwhile
            if watched is None:
                watched = self._watched[job_id] = _Watched(cursor)
                watched.reader = asyncio.create_task(self._follow(job_id, watched))
        watched.subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        watched = self._watched.get(subscription.job_id)
        if watched is None:
            return
        watched.subscriptions.discard(subscription)
        if not watched.subscriptions:
            del self._watched[subscription.job_id]
            if watched.reader is not None:
                watched.reader.cancel()

    @property
    def watched_jobs(self) -> int:
        return len(self._watched)

    def ring(self, job_id: str) -> None:
        """The job has new events (if anyone watches it)."""
        if (watched := self._watched.get(job_id)) is not None:
            watched.rung.set()

    def ring_all(self) -> None:
        for watched in self._watched.values():
            watched.rung.set()

    # ---- reading

    async def _follow(self, job_id: str, watched: _Watched) -> None:
        """The job's reader, while it is watched: one read per ring, or per burst of them."""
        while True:
            await watched.rung.wait()
            watched.rung.clear()
            try:
                await self.read_new(job_id, watched)
            except Exception:  # the next ring or the periodic read tries again
                logger.warning("live hub: reading %s failed", job_id, exc_info=True)

    async def read_new(self, job_id: str, watched: _Watched) -> None:
        """Read the job's new events once and hand them to its streams."""
        while True:
            batch = await asyncio.to_thread(events_after, self.database, job_id, watched.cursor)
            if not batch:
                return
            watched.cursor = batch[-1].id
            for subscription in list(watched.subscriptions):
                try:
                    subscription.batches.put_nowait(batch)
                except asyncio.QueueFull:
                    subscription.lagging = True
            if len(batch) < PAGE:
                return

    # ---- background tasks

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self.redis_url)  # payloads stay unread bytes
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                    self.ring_all()  # whatever rang while we were away
                    async for message in pubsub.listen():
                        if message.get("type") == "pmessage":
                            self.ring(message["channel"].decode().removeprefix(CHANNEL_PREFIX))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: streams still get the periodic reads
                logger.warning("live hub: Redis subscription lost; retrying", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            self.ring_all()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        readers = [watched.reader for watched in self._watched.values() if watched.reader]
        tasks = [*self._tasks, *readers]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a read stuck in a database call must not hold up the shutdown.
            await asyncio.wait(tasks, timeout=STOP_SECONDS)
        self._tasks = []
