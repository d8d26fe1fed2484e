"""Runs one file's validation for the Celery task: fetch, check, record, send the jobs
that were waiting for it.

A file leaves `validating` exactly once: a crash while checking it records `invalid`
with the reason, a duplicate delivery finds it settled and does nothing, and only a
lost database connection leaves it for the reaper to send again.

A crash the process cannot catch (the OOM killer's SIGKILL) records nothing, and Celery
gives the message back (late acks, reject on worker lost): each delivery counts itself
in the file's row first, and the one after MAX_VALIDATION_ATTEMPTS records the file
`invalid` instead of checking it again. Deliveries the reaper sends count the same.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

import redis
import sqlalchemy.exc
from sqlalchemy import update

from app.db import Database
from app.errors import NotFound
from app.files.models import DataFile
from app.files.usage import record_validation
from app.jobs.runs import send_jobs
from app.live.channels import ring
from app.queue import Sender
from app.settings import Settings
from worker.datafiles.fetch import fetch_file
from worker.datafiles.validate import ValidationReport, validate_file
from worker.faults import parse_faults

logger = logging.getLogger(__name__)

# Deliveries of one file's validation that may begin: a file whose checks killed its
# worker process this often is recorded invalid rather than tried forever.
MAX_VALIDATION_ATTEMPTS = 2


def validate_stored_file(file_id: str, settings: Settings, *, enqueue: Sender) -> None:
    """Validate file `file_id` and record the result; `enqueue` sends each job that was
    waiting for the file and can now run."""
    database = Database(settings.effective_database_url)
    try:
        report = _check(database, settings, file_id)
        if report is None:
            return
        with database.session() as session:
            recorded = record_validation(
                session,
                file_id=file_id,
                status=report.status,
                kind=report.kind,
                errors=report.errors,
                stats=report.stats,
            )
            session.commit()
        if not recorded.recorded:
            logger.info("file %s: validated by another delivery already", file_id)
            return
        logger.info(
            "file %s is %s%s; jobs sent: %s, failed: %s",
            file_id,
            report.status,
            f" ({report.kind})" if report.kind else "",
            ", ".join(recorded.to_send) or "none",
            ", ".join(recorded.failed) or "none",
        )
        with database.session() as session:
            send_jobs(session, recorded.to_send, send=enqueue)
        if recorded.failed and settings.redis_url:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
            try:
                ring(client, recorded.failed)  # their streams show the failure at once
            finally:
                client.close()
    finally:
        database.dispose()


def _check(database: Database, settings: Settings, file_id: str) -> ValidationReport | None:
    """The file's validation report; None when there is nothing to record (the file is
    gone, or no longer validating)."""
    with database.session() as session:
        data_file = session.get(DataFile, file_id)
        if data_file is None or data_file.status != "validating":
            state = "deleted" if data_file is None else data_file.status
            logger.info("file %s is %s: nothing to validate", file_id, state)
            return None
        file_format = data_file.format
        # Count this delivery in the file's row (one conditional update: two at once count
        # two); None when the file is no longer validating (settled or deleted since).
        attempt = session.scalar(
            update(DataFile)
            .where(DataFile.id == file_id, DataFile.status == "validating")
            .values(validation_attempts=DataFile.validation_attempts + 1)
            .returning(DataFile.validation_attempts)
        )
        session.commit()
    if attempt is None:
        return None
    if attempt > MAX_VALIDATION_ATTEMPTS:
        logger.error(
            "file %s: validation was killed %d times; recording it invalid", file_id, attempt - 1
        )
        return ValidationReport.invalid(
            f"validation ran out of memory or crashed: the worker process checking this "
            f"file was killed {attempt - 1} times (the worker's log has the details)"
        )
    if "kill_validation" in parse_faults(settings.test_faults):
        os.kill(os.getpid(), signal.SIGKILL)  # testing only: as the OOM killer would
    with tempfile.TemporaryDirectory(prefix="trainjob-validate-") as directory:
        try:
            path = fetch_file(
                database, file_id=file_id, files_dir=settings.files_dir, directory=Path(directory)
            )
            return validate_file(path, file_format)
        except NotFound:
            logger.info("file %s was deleted while it was being validated", file_id)
            return None
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
            # The database went away: nothing can be recorded now. The file stays
            # `validating` and the reaper sends its validation again.
            raise
        except Exception as failure:  # unreadable bytes or a bug: say so, never hang
            logger.exception("file %s: validation crashed", file_id)
            return ValidationReport.invalid(f"the file could not be validated: {_reason(failure)}")


def _reason(failure: Exception) -> str:
    message = str(failure)
    # An error message of our own is meant for the user; anything else may hold paths.
    if type(failure).__module__.startswith(("worker.", "app.")) and message:
        return message
    return f"an internal error ({type(failure).__name__}); the worker's log has the details"
