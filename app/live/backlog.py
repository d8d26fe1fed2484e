"""A stream's stored backlog with its metrics thinned: what a chart needs, not every step.

A job of a million steps has a million `metrics` events; a page that opens it needs a
few thousand points for its curves. `sampled_events_after` returns every other event
(status, checkpoint, warnings: few) and at most `metrics_limit` metrics events, evenly
spaced over the stored ones with the newest `metrics_limit // 10` exact. The database
picks them (row numbers modulo a stride, over the job's index), so neither the API nor
the viewer reads the rest.
"""

from __future__ import annotations

import math

from sqlalchemy import and_, func, or_, select

from app.db import Database
from app.jobs.models import JobEvent
from app.live.hub import LiveEvent

METRICS = "metrics"


def sampled_events_after(
    database: Database, job_id: str, after: int, metrics_limit: int
) -> list[LiveEvent] | None:
    """The job's events after `after` with their metrics thinned to `metrics_limit`, oldest
    first; None when there are no more metrics than that (read them all, a page at a time).

    Only events up to the newest stored metrics event: a stream reads what follows (few,
    and written meanwhile perhaps) after it, as usual."""
    exact_tail = max(1, metrics_limit // 10)
    with database.session() as session:
        is_metrics = and_(JobEvent.job_id == job_id, JobEvent.id > after, JobEvent.type == METRICS)
        total, newest = session.execute(
            select(func.count(), func.max(JobEvent.id)).where(is_metrics)
        ).one()
        if total <= metrics_limit:
            return None
        # ceil: at most metrics_limit - exact_tail evenly spaced ones before the tail.
        stride = math.ceil((total - exact_tail) / (metrics_limit - exact_tail))
        ranked = (
            select(JobEvent.id, func.row_number().over(order_by=JobEvent.id).label("rank"))
            .where(is_metrics, JobEvent.id <= newest)
            .subquery()
        )
        # The chosen ids first (at most metrics_limit): as a subquery of the query below,
        # PostgreSQL ran it once per event of the job, minutes for a million.
        chosen = session.scalars(
            select(ranked.c.id).where(
                or_((ranked.c.rank - 1) % stride == 0, ranked.c.rank > total - exact_tail)
            )
        ).all()
        rows = session.execute(
            select(JobEvent.id, JobEvent.type, JobEvent.data)
            .where(
                JobEvent.job_id == job_id,
                JobEvent.id > after,
                JobEvent.id <= newest,
                or_(JobEvent.type != METRICS, JobEvent.id.in_(chosen)),
            )
            .order_by(JobEvent.id)
        ).all()
    return [LiveEvent(row.id, row.type, row.data) for row in rows]
