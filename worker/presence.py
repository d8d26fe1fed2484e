"""A worker says it is alive: its main process announces itself in Redis every few seconds,
under a key that expires, so that a worker that dies without a word drops off the
dashboard by itself; a clean shutdown deletes it at once.

It runs on the consumer's timer, the way Celery sends its own event heartbeats
(celery/worker/consumer/heart.py): the prefork parent starts no thread. The parent never
touches CUDA either (forking after CUDA initialisation breaks the children), so the device
is read from the driver's files, not asked of PyTorch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps

from app.dashboard.schemas import PRESENCE_KEY_PREFIX
from app.settings import Settings

logger = logging.getLogger(__name__)

# A key outlives this many missed announcements before a silent worker counts as gone.
PRESENCE_TTL_INTERVALS = 3
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def presence_key(name: str) -> str:
    return PRESENCE_KEY_PREFIX + name


def detect_device(
    gpus_dir: Path = NVIDIA_GPUS, visible_devices: str | None = None
) -> dict[str, Any]:
    """`cuda` when the NVIDIA driver lists a GPU and CUDA_VISIBLE_DEVICES does not hide
    them all, else `cpu`; with the variable as set, so that one can tell which GPU of a
    shared machine the worker trains on. A guess from files: it never initialises CUDA."""
    try:
        has_gpu = any(gpus_dir.iterdir())
    except OSError:  # no NVIDIA driver loaded
        has_gpu = False
    # Not configuration of ours: the CUDA runtime's own variable, read for the report.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible_devices is None else visible_devices
    hidden = visible is not None and visible.strip() in ("", "-1")
    return {
        "device": "cuda" if has_gpu and not hidden else "cpu",
        "cuda_visible_devices": visible,
    }


def announce(
    client: redis.Redis, info: dict[str, Any], *, ttl_seconds: float, now: datetime | None = None
) -> dict[str, Any]:
    """Write the worker's presence with a fresh `last_seen`; it expires after the TTL."""
    record = info | {"last_seen": (now or datetime.now(UTC)).isoformat()}
    client.set(
        presence_key(str(info["name"])),
        json.dumps(record, separators=(",", ":")),
        px=max(1, round(ttl_seconds * 1000)),
    )
    return record


def withdraw(client: redis.Redis, name: str) -> None:
    """The worker is stopping: take it off the list now rather than at the TTL."""
    client.delete(presence_key(name))


def presence_step(settings: Settings) -> type[bootsteps.StartStopStep]:
    """The consumer bootstep, bound to the worker's settings (for `app.steps['consumer']`)."""
    assert settings.redis_url is not None  # make_celery refuses to start without it
    interval = settings.heartbeat_seconds
    redis_url = settings.redis_url

    class Presence(bootsteps.StartStopStep):
        """Announces this worker on the consumer's timer while it consumes tasks."""

        # Start once the task consumer runs: from then on the worker takes jobs.
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.tref: Any = None
            # Short timeouts: a call blocks the worker's event loop while Redis is away.
            self.client = redis.Redis.from_url(
                redis_url, socket_timeout=2, socket_connect_timeout=2
            )
            self.info: dict[str, Any] = {
                "name": c.hostname,  # the node name, trainjob-PID@HOST: jobs.worker
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                **detect_device(),
                "queues": [],
                "concurrency": 1,
                "started_at": datetime.now(UTC).isoformat(),
            }

        def start(self, c: Any) -> None:
            self.info["queues"] = sorted(c.app.amqp.queues.consume_from)
            # The pool's size: how many jobs it runs at once, which preemption counts on
            # (app/jobs/devices.py live_capacity).
            self.info["concurrency"] = max(1, int(c.pool.num_processes or 1))
            self._announce()  # at once: the timer's first call is one interval away
            self.tref = c.timer.call_repeatedly(interval, self._announce)

        def stop(self, c: Any) -> None:
            if self.tref is not None:
                c.timer.cancel(self.tref)
                self.tref = None
            try:
                withdraw(self.client, self.info["name"])
            except redis.RedisError:  # the key expires by itself
                logger.warning("presence: could not withdraw %s", self.info["name"])

        shutdown = stop

        def _announce(self) -> None:
            try:
                announce(self.client, self.info, ttl_seconds=PRESENCE_TTL_INTERVALS * interval)
            except redis.RedisError as error:  # the next tick tries again
                logger.warning("presence: could not announce %s: %s", self.info["name"], error)

    return Presence
