"""Live events on Redis pub/sub: at most once, for streaming. Postgres stays the truth."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

logger = logging.getLogger(__name__)


def job_channel(job_id: str) -> str:
    return f"trainjob:job:{job_id}"


class LivePublisher:
    def __init__(self, redis_url: str | None) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5) if redis_url else None

    def publish(self, job_id: str, messages: list[dict[str, Any]]) -> None:
        if self.client is None or not messages:
            return
        try:
            pipeline = self.client.pipeline(transaction=False)
            for message in messages:
                pipeline.publish(job_channel(job_id), json.dumps(message, default=str))
            pipeline.execute()
        except redis.RedisError:  # live updates are best effort; the database has it all
            logger.warning("could not publish live events for %s", job_id, exc_info=True)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
