"""Whether a job's devices are there to run it: `cuda` needs a live worker that has CUDA,
`devices` N a live worker that consumes the queue of jobs on N devices; and what the live
workers can take now, for preemption.

Workers announce themselves, with their device and queues, in Redis (worker/presence.py);
the dashboard reads those records and so does this.
"""

from __future__ import annotations

import logging

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dashboard import service as dashboard_service
from app.jobs import gangs
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES
from app.jobs.scheduling import Capacity
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


def live_capacity(session: Session, client: redis.Redis, *, queue: str) -> Capacity | None:
    """What the live workers of `queue` can take now: for a device count, the workers that
    consume its training queue, and how many of them run fewer live jobs than their pool
    (`concurrency`) holds. None when Redis does not answer: nothing is known of the
    workers, and nothing is preempted on a guess."""
    try:
        workers = dashboard_service.live_workers(client)
    except redis.RedisError as error:
        logger.warning("reaper: cannot read worker presence (%s); no preemption now", error)
        return None
    names = [worker.name for worker in workers]
    running = dict(
        session.execute(
            select(Job.worker, func.count())
            .where(Job.status.in_(LIVE_STATUSES), Job.worker.in_(names))
            .group_by(Job.worker)
        ).all()
    )
    # A worker that follows a gang (app/jobs/gangs.py) spends a pool slot on it too.
    for name, count in gangs.busy_followers(session, workers=names).items():
        running[name] = running.get(name, 0) + count

    def consuming(devices: int) -> set[str]:
        wanted = training_queue(queue, devices)
        return {worker.name for worker in workers if wanted in worker.queues}

    def free_slots(devices: int) -> int:
        names = consuming(devices)
        return sum(
            running.get(worker.name, 0) < worker.concurrency
            for worker in workers
            if worker.name in names
        )

    return Capacity(workers=consuming, free_slots=free_slots)


def free_nodes(session: Session, client: redis.Redis, *, queue: str, devices: int) -> int:
    """How many workers could join a gang of nodes on `devices` devices now: live workers
    of the queue with a free pool slot, less the open slots of gangs already forming
    (they will take as many). At least 1 (the asking worker is free); 1 when Redis does
    not answer, so that no multi-node job starts on a guess."""
    capacity = live_capacity(session, client, queue=queue)
    if capacity is None:
        return 1
    free = capacity.free_slots(devices) - gangs.open_slots(session, devices=devices)
    return max(1, free)
