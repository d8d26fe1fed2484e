"""The dispatcher's schedule, claims and order, on both databases (no HTTP here: the
route tests send to a real receiver)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.db import Database, utcnow
from app.jobs import service as jobs_service
from app.webhooks.dispatcher import RETRY_SCHEDULE, claim_due, record_outcome, retry_delay
from app.webhooks.sender import Outcome
from tests.app.jobs.helpers import create
from tests.app.webhooks.helpers import deliveries, register


def test_the_backoff_schedule_spans_a_day_then_gives_up_and_scales() -> None:
    delays = [retry_delay(n) for n in range(1, 9)]
    assert delays == [5, 300, 1800, 7200, 18000, 36000, 36000, None]
    assert sum(RETRY_SCHEDULE) / 3600 > 24  # retried for more than a day
    assert retry_delay(2, scale=0.01) == pytest.approx(3.0)


def outcome(status_code: int | None, error: str | None = None) -> Outcome:
    return Outcome(datetime.now(UTC), 3, status_code, "body", error)


def test_a_jobs_deliveries_to_an_endpoint_go_one_at_a_time_in_order(
    own_database: Database,
) -> None:
    endpoint = register(own_database, "job.queued", "job.cancelled")
    job_id = create(own_database)
    other_job = create(own_database)
    with own_database.session() as session:
        jobs_service.request_cancel(session, job_id=job_id)
        session.commit()
    now = utcnow()
    with own_database.sessions.begin() as session:
        first = claim_due(session, now=now, lease_seconds=60, limit=10)
    # The cancelled event waits for the queued one; the other job's goes at once.
    assert [(c.message.job_id, c.message.type) for c in first] == [
        (job_id, "job.queued"), (other_job, "job.queued"),
    ]  # fmt: skip
    with own_database.sessions.begin() as session:
        assert claim_due(session, now=now, lease_seconds=60, limit=10) == []  # claimed
    with own_database.sessions.begin() as session:
        assert record_outcome(
            session, claimed=first[0], outcome=outcome(500, "HTTP 500"), now=now, retry_scale=1
        )
        assert record_outcome(
            session, claimed=first[1], outcome=outcome(200), now=now, retry_scale=1
        )
    with own_database.sessions.begin() as session:  # the failed one waits its 5 s
        assert claim_due(session, now=now, lease_seconds=60, limit=10) == []
    later = now + timedelta(seconds=6)
    with own_database.sessions.begin() as session:
        retried = claim_due(session, now=later, lease_seconds=60, limit=10)
    assert [(c.message.type, c.attempt) for c in retried] == [("job.queued", 2)]
    assert retried[0].message.webhook_id == first[0].message.webhook_id
    with own_database.sessions.begin() as session:
        record_outcome(session, claimed=retried[0], outcome=outcome(204), now=later, retry_scale=1)
    with own_database.sessions.begin() as session:
        after = claim_due(session, now=later, lease_seconds=60, limit=10)
    assert [(c.message.job_id, c.message.type) for c in after] == [(job_id, "job.cancelled")]
    statuses = [(row.type, row.status, row.attempts) for row in deliveries(own_database, endpoint)]
    assert statuses == [
        ("job.queued", "succeeded", 2), ("job.queued", "succeeded", 1),
        ("job.cancelled", "pending", 0),
    ]  # fmt: skip


def test_an_expired_claim_is_taken_over_and_the_stale_outcome_is_dropped(
    own_database: Database,
) -> None:
    register(own_database, "job.queued")
    create(own_database)
    now = utcnow()
    with own_database.sessions.begin() as session:
        [stale] = claim_due(session, now=now, lease_seconds=1, limit=10)
    later = now + timedelta(seconds=2)
    with own_database.sessions.begin() as session:
        [fresh] = claim_due(session, now=later, lease_seconds=60, limit=10)
    assert fresh.message.webhook_id == stale.message.webhook_id and fresh.attempt == 1
    with own_database.sessions.begin() as session:
        assert not record_outcome(
            session, claimed=stale, outcome=outcome(200), now=later, retry_scale=1
        )
        assert record_outcome(
            session, claimed=fresh, outcome=outcome(200), now=later, retry_scale=1
        )


def test_a_delivery_is_failed_when_its_retries_run_out(own_database: Database) -> None:
    endpoint = register(own_database, "job.queued")
    create(own_database)
    now = utcnow()
    for attempt in range(1, len(RETRY_SCHEDULE) + 2):
        with own_database.sessions.begin() as session:
            [claimed] = claim_due(session, now=now, lease_seconds=60, limit=10)
            assert claimed.attempt == attempt
            record_outcome(
                session, claimed=claimed, outcome=outcome(None, "timed out"), now=now,
                retry_scale=0.000001,
            )  # fmt: skip
        now += timedelta(seconds=1)
    [row] = deliveries(own_database, endpoint)
    assert (row.status, row.attempts) == ("failed", len(RETRY_SCHEDULE) + 1)
