"""The Celery app: configuration only, no torch. The API imports this to enqueue.

Settings follow the notes on long GPU jobs (docs/operations.md): late acks, one
prefetched message, a fresh child per job, a visibility timeout above the longest job.
"""

from __future__ import annotations

from celery import Celery

from app.queue import TRAIN_TASK, VALIDATE_TASK
from app.settings import Settings
from worker.presence import presence_step


def broker_url(redis_url: str) -> str:
    """Celery names a Redis unix socket `redis+socket://`; redis-py names it `unix://`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


def make_celery(settings: Settings) -> Celery:
    if settings.redis_url is None:
        raise RuntimeError("TRAINJOB_REDIS_URL is not set (and no embedded Redis was started)")
    app = Celery("trainjob", broker=broker_url(settings.redis_url), include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        # A fresh child imports torch before it says it is up (worker/tasks.py preloads
        # the engine); Celery's default 4 s would SIGKILL it on a loaded machine.
        worker_proc_alive_timeout=120.0,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        task_track_started=True,
        task_ignore_result=True,
        task_routes={
            TRAIN_TASK: {"queue": settings.queue},
            VALIDATE_TASK: {"queue": settings.files_queue},
        },
        task_default_queue=settings.queue,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        broker_connection_retry_on_startup=True,
        # Submitting must not hang when the broker is away: the job row is committed
        # already and is re-sent later.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        task_serializer="json",
        accept_content=["json"],
    )
    # Workers announce themselves in Redis for the dashboard (worker/presence.py).
    app.steps["consumer"].add(presence_step(settings))
    return app
