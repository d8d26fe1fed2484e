"""What the job GET adds to a job's row: its queue position and its estimated finish.

Both are read only for the jobs they concern, so the GET of a finished job stays one
primary-key read: a queued job's position is the claim order's (app/jobs/scheduling.py,
a sync query in the thread pool), a running job's estimate one read of its latest
metrics (app/reads.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import Table, bindparam, select

from app.db import Database, utcnow
from app.jobs import scheduling
from app.jobs.models import JobMetric
from app.jobs.schemas import as_utc
from app.reads import Reads, Statement

# The pace is measured over the latest steps of the current run, at most this many: recent
# enough to follow a change of pace, enough to smooth one slow step (a checkpoint's).
PACE_STEPS = 50
RUNNING_STATUSES = frozenset({"running", "pausing"})

METRICS = cast(Table, JobMetric.__table__)


@cache
def _recent_steps_query() -> Statement:
    # The steps written since the run started: a resumed run rewrites the steps after its
    # checkpoint, and the older run's rows past them (time before the start) are left out.
    return (
        select(METRICS.c.step, METRICS.c.time)
        .where(METRICS.c.job_id == bindparam("job_id"), METRICS.c.time >= bindparam("since"))
        .order_by(METRICS.c.step.desc())
        .limit(PACE_STEPS)
    )


def finish_at_pace(steps: Sequence[Any], *, total_steps: int) -> datetime | None:
    """When step `total_steps` is reached at the pace of `steps` (rows with `step` and
    `time`, newest first), measured from the newest; None with fewer than two steps."""
    if len(steps) < 2:
        return None
    newest, oldest = steps[0], steps[-1]
    newest_time, oldest_time = as_utc(newest.time), as_utc(oldest.time)
    assert newest_time is not None and oldest_time is not None
    seconds = (newest_time - oldest_time).total_seconds()
    if newest.step <= oldest.step or seconds <= 0:
        return None
    seconds_per_step = seconds / (newest.step - oldest.step)
    remaining = max(total_steps - newest.step, 0)
    return newest_time + timedelta(seconds=remaining * seconds_per_step)


async def estimated_finish(reads: Reads, *, job: Any) -> datetime | None:
    """When a running job should finish at the pace of its current run's latest steps;
    None when it does not run, its total is unknown, or fewer than two steps have run."""
    # max_steps: the spec's, or the total an epochs job's engine reports when it starts.
    if job.status not in RUNNING_STATUSES or job.max_steps is None:
        return None
    if job.last_started_at is None or job.step < 1:
        return None
    params = {"job_id": job.id, "since": job.last_started_at}
    steps = await reads.all(_recent_steps_query(), params)
    return finish_at_pace(steps, total_steps=job.max_steps)


def queue_position(database: Database, *, job: Any, policy: scheduling.Policy) -> int | None:
    """How many jobs would run before this queued one now; None when it is not queued."""
    if job.status != "queued":
        return None
    with database.session() as session:
        return scheduling.queue_position(
            session, job_id=job.id, devices=job.devices, now=utcnow(), policy=policy
        )
