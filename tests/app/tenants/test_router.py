"""Tenants as an admin sets them, and the caps and quotas a submit meets, through the API
with keys (a database of its own per test: auth turns on once a key exists)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.auth import service as auth_service
from app.db import Database, utcnow
from app.jobs import runs
from app.jobs.models import Job, JobAttempt, JobEvent
from app.jobs.reaper import Reaper
from tests.app.auth.test_auth import SPEC, Keys


def put(client: TestClient, keys: Keys, name: str, **body: Any) -> Any:
    return client.put(f"/v1/tenants/{name}", json=body, headers=keys.header(keys.admin))


def submit(client: TestClient, key: str, **changes: Any) -> Any:
    return client.post(
        "/v1/jobs", json={**SPEC, **changes}, headers={"authorization": f"Bearer {key}"}
    )


def test_only_an_admin_sets_a_tenant_and_a_tenant_reads_only_its_own(
    client: TestClient, keys: Keys
) -> None:
    denied = client.put("/v1/tenants/acme", json={"share": 2}, headers=keys.header(keys.a))
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "forbidden"
    response = put(client, keys, "acme", share=2, max_queued_jobs=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["share"], body["max_queued_jobs"], body["max_priority"]) == (2, 5, None)
    assert body["usage"] == {"running_devices": 0, "queued_jobs": 0, "device_hours_30d": 0,
                             "device_seconds_recent": 0}  # fmt: skip
    # Fields left out keep their values; null clears.
    body = put(client, keys, "acme", max_queued_jobs=None, max_priority=600).json()
    assert (body["share"], body["max_queued_jobs"], body["max_priority"]) == (2, None, 600)
    assert client.get("/v1/tenants/acme", headers=keys.header(keys.a)).json()["share"] == 2
    other = client.get("/v1/tenants/acme", headers=keys.header(keys.b))
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
    listed = client.get("/v1/tenants", headers=keys.header(keys.admin)).json()
    assert "acme" in [tenant["name"] for tenant in listed["data"]]
    assert client.get("/v1/tenants", headers=keys.header(keys.a)).status_code == 403
    bad = put(client, keys, "acme", share=0, surprise=1)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "validation_error"


def test_a_priority_above_the_tenants_or_keys_cap_is_refused(
    client: TestClient, keys: Keys, own_database: Database
) -> None:
    put(client, keys, "acme", max_priority=600)
    refused = submit(client, keys.a, priority=700)
    assert refused.status_code == 403
    assert refused.json()["error"] | {"message": ""} == {
        "type": "priority_not_allowed", "message": "", "priority": 700, "max_priority": 600,
    }  # fmt: skip
    assert submit(client, keys.a, priority=600).status_code == 201
    with own_database.session() as session:
        _, capped = auth_service.create_key(session, tenant="acme", admin=False, max_priority=300)
        session.commit()
    assert submit(client, capped, priority=400).json()["error"]["type"] == "priority_not_allowed"
    assert submit(client, capped, priority=300).json()["priority"] == 300


def test_only_an_admin_may_opt_a_job_out_of_preemption(client: TestClient, keys: Keys) -> None:
    refused = submit(client, keys.a, preemptible=False)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    assert submit(client, keys.admin, preemptible=False).json()["preemptible"] is False


def test_a_submit_over_the_queued_quota_is_429(client: TestClient, keys: Keys) -> None:
    put(client, keys, "acme", max_queued_jobs=2)
    assert [submit(client, keys.a).status_code for _ in range(2)] == [201, 201]
    refused = submit(client, keys.a)
    assert refused.status_code == 429 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert (error["type"], error["quota"], error["limit"], error["queued_jobs"]) == (
        "quota_exceeded", "max_queued_jobs", 2, 2,
    )  # fmt: skip
    assert submit(client, keys.b).status_code == 201  # another tenant is not held


def test_a_tenant_past_its_device_hours_gets_403_with_the_figures(
    client: TestClient, keys: Keys, own_database: Database
) -> None:
    put(client, keys, "acme", max_device_hours=1.0)
    job = submit(client, keys.a, devices=2, batch_size=16).json()
    with own_database.session() as session:  # a finished run: 2 devices × 45 minutes
        taken = runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        assert taken is not None
        session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job["id"])
            .values(
                started_at=utcnow() - timedelta(minutes=46),
                ended_at=utcnow() - timedelta(minutes=1),
            )
        )
        session.commit()
    refused = submit(client, keys.a)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["type"], error["quota"], error["limit"]) == (
        "quota_exceeded",
        "max_device_hours",
        1.0,
    )
    assert abs(error["used_device_hours"] - 1.5) < 0.01
    usage = client.get("/v1/tenants/acme", headers=keys.header(keys.a)).json()["usage"]
    assert abs(usage["device_hours_30d"] - 1.5) < 0.01


def test_a_job_over_the_running_devices_quota_waits_with_a_warning_naming_it(
    client: TestClient, keys: Keys, own_database: Database
) -> None:
    put(client, keys, "acme", max_running_devices=1)
    running, waiting = (submit(client, keys.a).json()["id"] for _ in range(2))
    with own_database.session() as session:
        assert runs.claim_job(session, job_id=running, worker="w", lease_timeout=60)
        session.commit()
    reaper = Reaper(own_database, lease_timeout=60, requeue_after=300, interval=1,
                    send=lambda job_id, devices: True, waiting=lambda devices: 0)  # fmt: skip
    assert reaper.run_once().held == [waiting]
    assert reaper.run_once().held == []  # once
    events = client.get(
        f"/v1/jobs/{waiting}/events", params={"type": "warning"}, headers=keys.header(keys.a)
    ).json()["data"]
    assert len(events) == 1
    assert events[0]["data"]["quota"] == "max_running_devices"
    assert "max_running_devices=1" in events[0]["data"]["message"]
    assert (
        client.get(f"/v1/jobs/{waiting}", headers=keys.header(keys.a)).json()["status"] == "queued"
    )
    with own_database.session() as session:
        assert session.query(JobEvent).filter_by(job_id=running, type="warning").count() == 0
    # The running job ends: the next pass lets the held one go and sends it at once.
    sent: list[str] = []
    reaper.send = lambda job_id, devices: sent.append(job_id) or True
    with own_database.session() as session:
        runs.finish_job(session, claim=claim_of(own_database, running), status="succeeded")
        session.commit()
    assert reaper.run_once().sent == [waiting] and sent == [waiting]


def claim_of(database: Database, job_id: str) -> runs.Claim:
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return runs.Claim(job_id, job.lease, job.attempts, 0, 0.0)
