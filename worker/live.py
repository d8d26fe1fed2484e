"""Rings the live hubs' doorbell on Redis pub/sub after each commit: one PUBLISH of the
batch of events the commit added (at most once: the hubs also poll the database).

The API's hub reads the events themselves from the database; the payload, a JSON list
of `{"type", "data"}`, is for other subscribers (e.g. `redis-cli psubscribe 'trainjob:job:*'`).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from app.live.channels import ring


class LivePublisher:
    def __init__(self, redis_url: str | None) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5) if redis_url else None

    def publish(self, job_id: str, messages: list[dict[str, Any]]) -> None:
        if self.client is not None and messages:
            ring(self.client, [job_id], json.dumps(messages, default=str).encode())

    def status(self, job_id: str, status: str, **data: Any) -> None:
        self.publish(job_id, [{"type": "status", "data": {"status": status, **data}}])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
