"""Graceful worker shutdown: checkpoint the running job and hand it back to the queue.

On SIGTERM Celery starts a warm shutdown, which waits for the running task however
long it takes. Before waiting it sends `worker_shutting_down` in the main process; we
then set `release_requested` on this worker's running jobs. Their lease threads read
it within `heartbeat_seconds`, the loop stops at the next optimizer step, writes a
checkpoint and puts the job back as `queued` without counting an attempt.

The bound: `shutdown_timeout_seconds` after the signal this process sends itself
SIGQUIT, Celery's cold shutdown, which terminates the task; the job's lease then
expires and the reaper re-queues it (counted as `worker_lost`).

With no task in hand there is nothing to wait for, yet the warm shutdown would wait for
every pool child to come up before telling it to stop: a fresh child imports torch for
seconds (minutes on a loaded machine), and one that never sends Celery its UP message
holds the shutdown for `worker_proc_alive_timeout`. So then the idle children are killed
at once, and the worker exits in about a second.

Pool children die with the worker's main process even when it is SIGKILLed: an orphaned
child could not report to Celery, and would hold the job's lease until it ended.

Why not REMAP_SIGTERM=SIGQUIT with `worker_soft_shutdown_timeout`: in Celery 5.5-5.7
the cold handler waits out the soft-shutdown period *before* it sends
`worker_shutting_down` (celery/apps/worker.py, `_shutdown_handler`), so the job would
learn of the shutdown only when the time to stop cleanly is already gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import psutil
from celery.signals import worker_process_init, worker_shutting_down
from celery.worker import state

from app.db import Database
from app.jobs.runs import request_release
from app.settings import Settings
from worker.parent_death import dies_with

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


def kill_idle_pool(worker: int, interval: float = 0.1) -> None:
    """Kill the pool children of `worker` until it exits, those the pool forks again before
    it closes included. Only when no task is in hand: an idle child loses nothing."""
    logger.info("shutdown: no task in hand, stopping the pool's idle children now")
    parent = psutil.Process(worker)
    while True:
        for child in parent.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        time.sleep(interval)


def install_graceful_shutdown(settings: Settings) -> None:
    """Connect the handlers in the worker's main process (pool children inherit them)."""
    main_process = os.getpid()

    @worker_process_init.connect(weak=False)
    def _die_with_the_worker(**_: Any) -> None:
        # Pool children are forked by the main thread of the main process.
        dies_with(main_process, signal.SIGKILL)()

    @worker_shutting_down.connect(weak=False)
    def _on_shutting_down(sender: str, how: str = "", **_: Any) -> None:
        # Runs inside a signal handler: do the database work on a thread.
        threading.Thread(
            target=release_jobs_of, args=(settings, sender), name="trainjob-release", daemon=True
        ).start()
        if how != "Warm":
            return
        # A task received and not finished: waiting for a pool child, or running in one.
        if state.reserved_requests or state.active_requests:
            force = threading.Timer(
                settings.shutdown_timeout_seconds, os.kill, (main_process, signal.SIGQUIT)
            )
            force.daemon = True
            force.start()
        else:
            threading.Thread(
                target=kill_idle_pool, args=(main_process,), name="trainjob-stop-pool", daemon=True
            ).start()
