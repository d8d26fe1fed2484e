"""Webhook deliveries survive an API restart mid-retry: a real `trainjob serve` process,
stopped while its receiver fails every delivery and started again, on a database of its
own. Nothing is lost, no webhook-id is delivered twice, and each job's events arrive in
order."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import select

from app.db import Database
from app.webhooks.models import WebhookDelivery
from tests.app.auth.test_auth import SPEC
from tests.app.webhooks.receiver import RECEIVER_PATH, Receiver, receiving
from tests.conftest import REDIS_URL, wait_for
from tests.processes import service_env, serving


def submit_and_cancel(api: str) -> str:
    job = httpx.post(f"{api}/v1/jobs", json=SPEC, timeout=10).json()
    httpx.post(f"{api}/v1/jobs/{job['id']}/cancel", timeout=10).raise_for_status()
    return str(job["id"])


def delivery_rows(url: str) -> list[WebhookDelivery]:
    database = Database(url)
    try:
        with database.session() as session:
            return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))
    finally:
        database.dispose()


def test_deliveries_survive_an_api_restart_mid_retry(
    own_postgres_url: str, tmp_path: Path, queue_name: str
) -> None:
    env = service_env(
        database_url=own_postgres_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-webhooks",
        home=str(tmp_path / "home"),
        reaper_interval_seconds="0",  # no worker: nothing to reap
        webhook_allowed_networks="127.0.0.0/8",
        webhook_poll_seconds="0.1",
        webhook_retry_scale="0.002",  # 10 ms, 0.6 s, 3.6 s, ...
    )
    with receiving(failing=True) as receiver:
        with serving(env, tmp_path / "api-1.log") as api:
            body = {"url": receiver.url, "events": ["job.queued", "job.cancelled"]}
            created = httpx.post(f"{api.url}/v1/webhooks", json=body, timeout=10).json()
            receiver.secret = created["secret"]
            jobs = [submit_and_cancel(api.url), submit_and_cancel(api.url)]
            # Each job's first delivery failed twice: the API stops mid-retry.
            wait_for(lambda: len(receiver.received) >= 4, timeout=15, what="failed attempts")
        stopped = delivery_rows(own_postgres_url)
        assert [row.status for row in stopped] == ["pending"] * 4
        failed_before = len(receiver.received)
        receiver.failing = False
        with serving(env, tmp_path / "api-2.log"):
            wait_for(lambda: len(receiver.delivered()) == 4, timeout=30, what="all deliveries")
        assert receiver.unverified == []
    assert_delivered_once_each_in_order(receiver, jobs, own_postgres_url)
    assert failed_before >= 4 and all(r.answered == 500 for r in receiver.received[:failed_before])
    logs = (tmp_path / "api-1.log").read_text() + (tmp_path / "api-2.log").read_text()
    assert "failed: HTTP 500" in logs  # failures are logged, by webhook-id ...
    assert created["secret"] not in logs and RECEIVER_PATH not in logs  # ... not by URL


def assert_delivered_once_each_in_order(receiver: Receiver, jobs: list[str], url: str) -> None:
    rows = delivery_rows(url)
    delivered = receiver.delivered()
    assert sorted(r.webhook_id for r in delivered) == sorted(row.webhook_id for row in rows)
    assert len({r.webhook_id for r in delivered}) == 4  # none twice
    assert all(row.status == "succeeded" for row in rows)
    assert {row.type: row.attempts for row in rows if row.job_id == jobs[0]}["job.queued"] >= 2
    for job_id in jobs:
        # Every request about the job (failed ones too): `cancelled` only once `queued`
        # went through.
        seen = [(r.body["type"], r.answered) for r in receiver.received
                if r.body["data"]["job_id"] == job_id]  # fmt: skip
        first_cancelled = next(i for i, (kind, _) in enumerate(seen) if kind == "job.cancelled")
        assert ("job.queued", 204) in seen[:first_cancelled]
        assert [kind for kind, status in seen if status == 204] == ["job.queued", "job.cancelled"]
