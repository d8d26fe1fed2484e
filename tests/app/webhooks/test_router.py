"""Webhooks through the API: register, a job's events delivered signed to a real
receiver (retried until it answers), the deliveries list, the SSRF guard, tenants."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.auth.test_auth import SPEC, Keys
from tests.app.webhooks.receiver import receiving
from tests.conftest import wait_for


def register(client: TestClient, key: str, url: str, *events: str) -> Any:
    body = {"url": url, "events": list(events)}
    return client.post("/v1/webhooks", json=body, headers={"authorization": f"Bearer {key}"})


def test_a_jobs_events_arrive_signed_in_order_after_three_failures_and_are_listed(
    client: TestClient, keys: Keys
) -> None:
    a = keys.header(keys.a)
    with receiving(fail_first=3) as receiver:
        response = register(client, keys.a, receiver.url, "job.queued", "job.cancelled")
        assert response.status_code == 201, response.text
        created = response.json()
        receiver.secret = created["secret"]
        assert created["secret"].startswith("whsec_")
        assert created["events"] == ["job.queued", "job.cancelled"]
        shown = client.get(f"/v1/webhooks/{created['id']}", headers=a).json()
        assert "secret" not in shown and shown["url"] == receiver.url
        job = client.post("/v1/jobs", json=SPEC, headers=a).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=a).status_code == 200
        wait_for(lambda: len(receiver.delivered()) == 2, timeout=15, what="both deliveries")
    assert receiver.unverified == []
    # The first delivery failed 3 times and went through at the 4th, under one id; the
    # second waited for it.
    ids = [r.webhook_id for r in receiver.received]
    assert [r.answered for r in receiver.received] == [500, 500, 500, 204, 204]
    assert len(set(ids[:4])) == 1 and ids[4] != ids[0]
    queued, cancelled = (r.body for r in receiver.delivered())
    assert queued["type"] == "job.queued" and cancelled["type"] == "job.cancelled"
    assert queued["data"] == {"job_id": job["id"], "status": "queued"}
    assert cancelled["data"] == {"job_id": job["id"], "status": "cancelled"}
    assert queued["timestamp"].endswith("Z")
    listed = client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=a).json()
    assert [d["type"] for d in listed["data"]] == ["job.cancelled", "job.queued"]  # newest first
    last, first = listed["data"]
    assert (first["id"], first["status"], first["next_attempt_at"]) == (ids[0], "succeeded", None)
    assert [t["status_code"] for t in first["attempts"]] == [500, 500, 500, 204]
    assert [t["attempt"] for t in first["attempts"]] == [1, 2, 3, 4]
    assert first["attempts"][0]["error"] == "HTTP 500"
    assert first["attempts"][0]["response_excerpt"] == '{"ok": false}'
    assert first["attempts"][3]["error"] is None and first["attempts"][3]["started_at"]
    assert len(last["attempts"]) == 1
    page = client.get(f"/v1/webhooks/{created['id']}/deliveries?limit=1", headers=a).json()
    assert page["has_more"] and page["data"][0]["id"] == last["id"]
    rest = client.get(
        f"/v1/webhooks/{created['id']}/deliveries?limit=1&after={last['id']}", headers=a
    ).json()
    assert [d["id"] for d in rest["data"]] == [first["id"]] and not rest["has_more"]


REFUSED_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://[::1]:8080/",  # the operator allows 127.0.0.0/8, not ::1
    "http://[::ffff:10.0.0.1]/",
    "http://user:secret@127.0.0.1/",
    "ftp://127.0.0.1/",
]


# One database is enough: nothing here reaches it but the (empty) list.
@pytest.mark.parametrize("own_database", ["postgres"], indirect=True)
def test_ssrf_targets_and_unknown_event_types_are_refused_with_422(
    client: TestClient, keys: Keys
) -> None:
    for url in REFUSED_URLS:
        response = register(client, keys.a, url, "job.failed")
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["type"] == "webhook_url_refused", url
    unknown = register(client, keys.a, "http://127.0.0.1:9/", "job.metrics")
    assert unknown.status_code == 422 and unknown.json()["error"]["type"] == "validation_error"
    assert client.get("/v1/webhooks", headers=keys.header(keys.a)).json()["data"] == []


@pytest.mark.parametrize("own_database", ["postgres"], indirect=True)
def test_another_tenant_can_neither_see_nor_delete_an_endpoint(
    client: TestClient, keys: Keys
) -> None:
    a, b = keys.header(keys.a), keys.header(keys.b)
    first = register(client, keys.a, "http://127.0.0.1:9/one", "job.succeeded").json()
    second = register(client, keys.a, "http://127.0.0.1:9/two", "job.failed").json()
    listed = client.get("/v1/webhooks?limit=1", headers=a).json()
    assert [w["id"] for w in listed["data"]] == [second["id"]] and listed["has_more"]
    rest = client.get(f"/v1/webhooks?limit=1&after={second['id']}", headers=a).json()
    assert [w["id"] for w in rest["data"]] == [first["id"]] and not rest["has_more"]
    assert client.get("/v1/webhooks", headers=b).json()["data"] == []
    for method, path in [
        ("GET", f"/v1/webhooks/{first['id']}"),
        ("DELETE", f"/v1/webhooks/{first['id']}"),
        ("GET", f"/v1/webhooks/{first['id']}/deliveries"),
    ]:
        response = client.request(method, path, headers=b)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert client.delete(f"/v1/webhooks/{first['id']}", headers=a).status_code == 204
    assert client.get(f"/v1/webhooks/{first['id']}", headers=a).status_code == 404
    assert client.get("/v1/webhooks", headers=keys.header(keys.admin)).json()["data"] == [
        {k: v for k, v in second.items() if k != "secret"}
    ]
