"""The Redis pub/sub channel of a job: rung after every commit that adds its events."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "trainjob:job:"


def job_channel(job_id: str) -> str:
    return CHANNEL_PREFIX + job_id


def ring(client: redis.Redis, job_ids: Iterable[str], payload: bytes = b"") -> None:
    """Tell the live hubs that these jobs have new events, one PUBLISH each (at most once:
    they also poll). Best effort: the database has it all."""
    try:
        pipeline = client.pipeline(transaction=False)
        for job_id in job_ids:
            pipeline.publish(job_channel(job_id), payload)
        pipeline.execute()
    except redis.RedisError:
        logger.warning("could not ring the live channel", exc_info=True)
