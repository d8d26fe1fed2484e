"""Log lines of the server and the worker: plain text, or one JSON object a line.

Lines written while a job runs carry its id and attempt. They come from a context
variable that `job_context` sets around the run, and a filter on the handler copies
them onto every record, whichever logger wrote it, so library lines (SQLAlchemy,
redis) logged during the run carry them too.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import pythonjsonlogger.json

from app.settings import Settings

# Celery's worker format: what `trainjob worker` printed before there was a choice.
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

# (job_id, attempt) of the run in progress.
_job: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("job", default=None)


@contextmanager
def job_context(job_id: str, attempt: int) -> Iterator[None]:
    """Every line logged inside (in this thread, or a thread started with a copy of its
    context) carries `job_id` and `attempt`."""
    token = _job.set((job_id, attempt))
    try:
        yield
    finally:
        _job.reset(token)


def add_job_context(record: logging.LogRecord) -> bool:
    """The handler's filter: copies the running job's id and attempt onto the record."""
    if (job := _job.get()) is not None:
        record.job_id, record.attempt = job
    return True


class JsonFormatter(pythonjsonlogger.json.JsonFormatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, and job_id,
    attempt, exc_info and a line's other `extra` fields when there are."""

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_default=str,
            # uvicorn passes its message again with terminal colours as an extra field.
            reserved_attrs=[*pythonjsonlogger.core.RESERVED_ATTRS, "color_message"],
        )


class TrainjobHandler(logging.StreamHandler[TextIO]):
    """The root handler `configure_logging` installs: stderr, in the chosen format, with
    the job context filter."""

    def __init__(self, log_format: str) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(
            JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
        )
        self.addFilter(add_job_context)


def configure_logging(settings: Settings) -> None:
    """Install the one handler on the root logger (replacing one installed before), at
    settings.log_level. It never logs the settings: the database URL holds a password."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, TrainjobHandler):
            root.removeHandler(handler)
    root.addHandler(TrainjobHandler(settings.log_format))
    root.setLevel(settings.log_level.upper())
    # Python warnings (Celery's about running as root, say) become lines like the rest.
    logging.captureWarnings(True)
    # Every start checks the schema; alembic would describe its setup at INFO each time.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs each request's full URL at INFO: a webhook's path or query may hold a
    # receiver's token (app/webhooks/sender.py logs deliveries by id instead).
    logging.getLogger("httpx").setLevel(logging.WARNING)


def send_celery_logs_to_root() -> None:
    """Celery keeps a root logger that has handlers (worker_hijack_root_logger=False),
    but gives its task and multiprocessing loggers handlers of their own that do not
    propagate: take those away, so that every line of a worker has one format."""
    from celery import signals
    from celery.utils.log import get_multiprocessing_logger

    def to_root(logger: logging.Logger | None) -> None:
        if logger is not None:
            logger.handlers = []
            logger.propagate = True

    @signals.after_setup_logger.connect(weak=False)
    def after_setup_logger(**_: Any) -> None:
        to_root(get_multiprocessing_logger())

    @signals.after_setup_task_logger.connect(weak=False)
    def after_setup_task_logger(logger: logging.Logger, **_: Any) -> None:
        to_root(logger)
