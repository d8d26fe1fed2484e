"""One Redis subscription per API process, fanned out to every event stream it serves.

Redis pub/sub is only a doorbell here: "job X has new events", rung once per commit.
The hub follows only the jobs its streams watch and drops the other rings unread. On a
ring it reads that job's new events from the database once, after the last id it has
handed out, and gives the batch to every stream of the job. A thousand viewers of one
job cost one query per flush of its worker, not a thousand. Pub/sub delivers at most
once, so the hub also re-reads every watched job every `poll_seconds`, and after a
reconnect.

Why reading "after the last id" misses nothing: every writer of a job's events first
updates the job's row in the same transaction, so the row lock orders the writers of
one job and their event ids rise in commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
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
    fetching: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A read is waiting to start: it will see whatever a ring now announces.
    read_pending: bool = False


class LiveHub:
    def __init__(self, database: Database, redis_url: str, *, poll_seconds: float = 5.0) -> None:
        self.database = database
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self._watched: dict[str, _Watched] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Reads started by rings: kept, so that stop() can cancel them too.
        self._reads: set[asyncio.Task[None]] = set()

    # ---- streams

    async def subscribe(self, job_id: str) -> Subscription:
        """Register a stream; anything committed after this returns reaches it."""
        subscription = Subscription(job_id)
        watched = self._watched.get(job_id)
        if watched is None:
            cursor = await asyncio.to_thread(last_event_id, self.database, job_id)
            watched = self._watched.setdefault(job_id, _Watched(cursor))
        watched.subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        watched = self._watched.get(subscription.job_id)
        if watched is None:
            return
        watched.subscriptions.discard(subscription)
        if not watched.subscriptions:
            del self._watched[subscription.job_id]

    @property
    def watched_jobs(self) -> int:
        return len(self._watched)

    # ---- reading

    async def refresh(self, job_id: str) -> None:
        """Read the job's new events once and hand them to its streams."""
        watched = self._watched.get(job_id)
        if watched is None or watched.read_pending:
            return  # the pending read starts after this ring: it covers it
        watched.read_pending = True
        try:
            # Let the rings (and periodic reads) that arrive together coalesce here.
            await asyncio.sleep(0)
            await watched.fetching.acquire()  # one read per job at a time
        finally:
            watched.read_pending = False
        try:
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
        finally:
            watched.fetching.release()

    async def _ring(self, job_id: str) -> None:
        try:
            await self.refresh(job_id)
        except Exception:  # the next ring or the periodic read tries again
            logger.warning("live hub: reading %s failed", job_id, exc_info=True)

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(job_id) for job_id in list(self._watched)))

    # ---- background tasks

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self.redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                    await self.refresh_all()  # whatever rang while we were away
                    async for message in pubsub.listen():
                        if message.get("type") != "pmessage":
                            continue
                        channel = message["channel"]
                        if isinstance(channel, bytes):
                            channel = channel.decode()
                        job_id = channel.removeprefix(CHANNEL_PREFIX)
                        if job_id in self._watched:  # nobody watches the others
                            read = asyncio.create_task(self._ring(job_id))
                            self._reads.add(read)
                            read.add_done_callback(self._reads.discard)
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
            try:
                await self.refresh_all()
            except Exception:
                logger.warning("live hub: periodic read failed", exc_info=True)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._reads]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a read stuck in a database call must not hold up the shutdown.
            await asyncio.wait(tasks, timeout=STOP_SECONDS)
        self._tasks = []
        self._reads.clear()
