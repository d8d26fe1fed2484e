"""Whether a job's devices are there to run it: `cuda` needs a live worker that has CUDA,
`devices` N a live worker that consumes the queue of jobs on N devices.

Workers announce themselves, with their device and queues, in Redis (worker/presence.py);
the dashboard reads those records and so does this.
"""

from __future__ import annotations

import logging

import redis

from app.dashboard import service as dashboard_service
from app.jobs.spec import MAX_DEVICES
from app.queue import training_queue

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


def most_devices(client: redis.Redis, *, queue: str) -> int | None:
    """The most devices a live worker of `queue` runs a job on (a worker consumes the
    training queues of 1 to as many devices as it owns); None when no worker of the queue
    is live, or Redis does not answer: then there is nothing to compare with."""
    try:
        workers = dashboard_service.live_workers(client)
    except redis.RedisError as error:
        logger.warning("submit: cannot read worker presence (%s); devices not checked", error)
        return None
    counts = [
        max(n for n in range(1, MAX_DEVICES + 1) if training_queue(queue, n) in worker.queues)
        for worker in workers
        if queue in worker.queues
    ]
    return max(counts, default=None)
