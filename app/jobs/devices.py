"""Whether a job's device is there to run it: `cuda` needs a live worker that has CUDA.

Workers announce themselves, with their device and queues, in Redis (worker/presence.py);
the dashboard reads those records and so does this.
"""

from __future__ import annotations

import logging

import redis

from app.dashboard import service as dashboard_service

logger = logging.getLogger(__name__)


def cuda_worker_seen(client: redis.Redis, *, queue: str) -> bool:
    """A live worker consuming `queue` has CUDA. True as well when Redis does not answer:
    then nothing is known, and the job waits in the database until the broker is back."""
    try:
        workers = dashboard_service.live_workers(client)
    except redis.RedisError as error:
        logger.warning("submit: cannot read worker presence (%s); device not checked", error)
        return True
    return any(worker.device == "cuda" and queue in worker.queues for worker in workers)
