"""Rings the live hub's doorbell on Redis pub/sub after each commit (at most once).

The API's hub reads the events themselves from the database; the payload is for
other subscribers (e.g. `redis-cli psubscribe 'trainjob:job:*'`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from app.live.channels import job_channel

logger = logging.getLogger(__name__)


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
