"""The outbox: job events write their deliveries in their own transaction, one per
endpoint of the job's tenant that wants them, and nothing for the others."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import event

from app.db import Database, utcnow
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.spec import JobSpec
from app.webhooks import outbox
from tests.app.jobs.helpers import SPEC, claim, metric
from tests.app.webhooks.helpers import deliveries, register


def create(database: Database, tenant: str) -> str:
    with database.session() as session:
        spec = JobSpec.model_validate(SPEC)
        job_id = jobs_service.create_job(session, spec=spec, tenant=tenant).id
        session.commit()
        return job_id


def new_tenant() -> str:
    # The session's database is shared: a tenant of its own sees no other test's jobs.
    return f"hooks-{secrets.token_hex(4)}"


def test_a_runs_status_events_become_deliveries_in_order_for_the_endpoints_that_want_them(
    database: Database,
) -> None:
    tenant, own_database = new_tenant(), database
    wanted = register(own_database, "job.queued", "job.running", "job.succeeded", tenant=tenant)
    failures_only = register(own_database, "job.failed", tenant=tenant)
    other_tenant = register(own_database, "job.queued", "job.running", tenant=new_tenant())
    job_id = create(own_database, tenant)
    taken = claim(own_database, job_id, "worker-1")
    with own_database.session() as session:
        runs.record_progress(
            session, claim=taken, job_values={"step": 2},
            metrics=[metric(1), metric(2)], events=[],
        )  # fmt: skip
        runs.finish_job(session, claim=taken, status="succeeded")
        session.commit()
    rows = deliveries(own_database, wanted)
    assert [(row.type, row.job_status, row.job_id) for row in rows] == [
        ("job.queued", "queued", job_id),
        ("job.running", "running", job_id),
        ("job.succeeded", "succeeded", job_id),
    ]
    assert rows[1].data["worker"] == "worker-1" and rows[1].status == "pending"
    assert len({row.webhook_id for row in rows}) == 3
    assert all(row.webhook_id.startswith("msg_") for row in rows)
    assert deliveries(own_database, failures_only) == []
    assert deliveries(own_database, other_tenant) == []


def test_a_rolled_back_event_leaves_no_delivery(database: Database) -> None:
    tenant = new_tenant()
    endpoint = register(database, "job.queued", tenant=tenant)
    with database.session() as session:
        jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC), tenant=tenant)
        session.rollback()
    assert deliveries(database, endpoint) == []


def test_events_no_webhook_announces_cost_no_statement(database: Database) -> None:
    own_database = database
    job_id = create(own_database, new_tenant())
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(own_database.engine, "before_cursor_execute", count)
    try:
        with own_database.session() as session:
            events = [("metrics", {"step": 1}), ("warning", {"message": "m"})]
            outbox.enqueue_deliveries(session, job_id=job_id, events=events, now=utcnow())
            outbox.enqueue_deliveries(
                session, job_id=job_id, events=[("status", {"status": "odd"})], now=utcnow()
            )
            assert statements == []
            # A status event costs one statement, which inserts nothing here: no endpoint.
            outbox.enqueue_deliveries(
                session, job_id=job_id, events=[("status", {"status": "running"})], now=utcnow()
            )
            session.commit()
    finally:
        event.remove(own_database.engine, "before_cursor_execute", count)
    assert len([s for s in statements if s.lstrip().upper().startswith("INSERT")]) == 1
