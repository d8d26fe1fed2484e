"""Graceful worker shutdown: checkpoint the running job and hand it back to the queue.

On SIGTERM Celery starts a warm shutdown, which waits for the running task however
long it takes. Before waiting it sends `worker_shutting_down` in the main process; we
then set `release_requested` on this worker's running jobs. Their lease threads read
it within `heartbeat_seconds`, the loop stops at the next optimizer step, writes a
checkpoint and puts the job back as `queued` without counting an attempt.

The bound: `shutdown_timeout_seconds` after the signal this process sends itself
SIGQUIT, Celery's cold shutdown, which terminates the task; the job's lease then
expires and the reaper re-queues it (counted as `worker_lost`).

Why not REMAP_SIGTERM=SIGQUIT with `worker_soft_shutdown_timeout`: in Celery 5.5-5.7
the cold handler waits out the soft-shutdown period *before* it sends
`worker_shutting_down` (celery/apps/worker.py, `_shutdown_handler`), so the job would
learn of the shutdown only when the time to stop cleanly is already gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from celery.signals import worker_shutting_down

from app.db import Database
from app.jobs.runs import request_release
from app.settings import Settings

logger = logging.getLogger(__name__)


def release_jobs_of(settings: Settings, worker: str) -> None:
    database = Database(settings.effective_database_url)
    try:
        with database.session() as session:
            released = request_release(session, worker=worker)
            session.commit()
        logger.info("shutdown: asked %d running job(s) of %s to hand back", released, worker)
    except Exception:  # the jobs' leases expire and the reaper re-queues them instead
        logger.exception("shutdown: could not ask the jobs of %s to hand back", worker)
    finally:
        database.dispose()


def install_graceful_shutdown(settings: Settings) -> None:
    """Connect the handler in the worker's main process."""

    @worker_shutting_down.connect(weak=False)
    def _on_shutting_down(sender: str, how: str = "", **_: Any) -> None:
        # Runs inside a signal handler: do the database work on a thread.
        threading.Thread(
            target=release_jobs_of, args=(settings, sender), name="trainjob-release", daemon=True
        ).start()
        if how == "Warm":
            force = threading.Timer(
                settings.shutdown_timeout_seconds, os.kill, (os.getpid(), signal.SIGQUIT)
            )
            force.daemon = True
            force.start()
