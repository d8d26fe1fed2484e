"""The jobs HTTP contract: shapes, status codes, pagination, cancel, error envelope."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import Database, utcnow
from app.jobs import runs
from app.jobs.models import Job
from app.main import create_app
from app.settings import Settings

SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 3,
}
JOB_FIELDS = {
    "id", "name", "status", "spec", "batch_size", "micro_batch_size", "accumulation_steps",
    "progress", "metrics", "error", "attempts", "max_attempts", "worker", "runtime_seconds",
    "created_at", "started_at", "finished_at",
}  # fmt: skip
ATTEMPT_FIELDS = {
    "attempt", "worker", "started_at", "ended_at", "resumed_from_step", "reason", "counted",
}  # fmt: skip


def submit(client: TestClient, **changes: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**SPEC, **changes})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_submit_returns_the_queued_job_and_enqueues_only_its_id(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    before = redis_client.llen(settings.queue)
    job = submit(client, name="first")
    assert set(job) >= JOB_FIELDS
    assert job["id"].startswith("job_") and job["status"] == "queued" and job["name"] == "first"
    assert (job["batch_size"], job["micro_batch_size"], job["accumulation_steps"]) == (8, 4, 2)
    assert job["progress"] == {"step": 0, "max_steps": 3, "epoch": 0, "samples_seen": 0,
                               "tokens_seen": 0, "last_window_samples": None}  # fmt: skip
    assert job["spec"]["batch_size"] == 8 and job["error"] is None
    assert (job["attempts"], job["max_attempts"], job["worker"]) == (0, 3, None)
    assert job["runtime_seconds"] == 0.0
    assert redis_client.llen(settings.queue) == before + 1
    message = json.loads(redis_client.lindex(settings.queue, 0))  # type: ignore[arg-type]
    assert message["headers"]["task"] == "trainjob.train_job"
    assert message["headers"]["argsrepr"] == repr([job["id"]])


def test_get_returns_the_job_and_404_with_the_envelope_otherwise(client: TestClient) -> None:
    job = submit(client)
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    missing = client.get("/v1/jobs/job_000000000000000000000000")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    assert client.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_invalid_spec_is_422_listing_each_bad_field(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", json={**SPEC, "model": {"type": "resnet"}, "precision": "fp8", "extra": 1}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    paths = {field["path"] for field in error["fields"]}
    assert {"model", "precision", "extra"} <= paths
    model_error = next(f for f in error["fields"] if f["path"] == "model")
    known = "known: cnn, hf-causal-lm, hf-sequence-classification, mlp, tiny-gpt"
    assert known in model_error["message"]


def test_cross_field_errors_name_their_field(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={**SPEC, "batch_size": 9})
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["path"] == "batch_size"


def test_malformed_json_is_a_422_envelope(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error"]["type"] == "validation_error"


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "application/yaml", None],
    ids=["curl-d", "text", "yaml-type", "none"],
)
def test_a_json_body_is_taken_whatever_its_content_type(
    client: TestClient, content_type: str | None
) -> None:
    # curl -d '{...}' without -H sends application/x-www-form-urlencoded
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/jobs", content=json.dumps(SPEC).encode(), headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["max_steps"] == 3


YAML_SPEC = b"""model:
  type: mlp
dataset:
  type: digits
micro_batch_size: 4
accumulation_steps: 2
max_steps: 3
"""


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (YAML_SPEC, "application/yaml"),
        (YAML_SPEC, "application/x-www-form-urlencoded"),
        (b"max_steps=3&micro_batch_size=4", "application/x-www-form-urlencoded"),
    ],
    ids=["yaml", "yaml-as-curl-d", "form"],
)
def test_a_body_that_is_not_json_is_a_422_saying_what_to_send(
    client: TestClient, body: bytes, content_type: str
) -> None:
    response = client.post("/v1/jobs", content=body, headers={"content-type": content_type})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error" and [f["path"] for f in error["fields"]] == [""]
    assert "not valid JSON" in error["message"] and content_type in error["message"]
    assert "content-type: application/json" in error["message"]
    assert "trainjob submit SPEC.yaml" in error["message"]


def test_list_pages_newest_first_with_after_and_filters_by_status(client: TestClient) -> None:
    ids = []
    for _ in range(3):
        ids.append(submit(client)["id"])
        time.sleep(0.002)
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert set(page) == {"data", "has_more"} and page["has_more"] is True
    assert [job["id"] for job in page["data"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    cancelled = client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]
    assert ids[1] in {job["id"] for job in cancelled}
    assert all(job["status"] == "cancelled" for job in cancelled)


def test_list_rejects_out_of_range_limits_and_unknown_statuses(client: TestClient) -> None:
    for params in ({"limit": 0}, {"limit": 101}, {"status": "done"}):
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 422 and "error" in response.json()


def test_cancel_queued_is_immediate_and_cancel_finished_is_409(client: TestClient) -> None:
    job = submit(client)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["type"] == "job_finished"


def test_cancel_running_job_becomes_cancelling(client: TestClient, database: Database) -> None:
    job = submit(client)
    with database.session() as session:
        runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        session.commit()
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelling"


def test_pause_of_a_queued_job_is_immediate_and_resume_sends_it_again(
    client: TestClient, settings: Settings, redis_client: redis.Redis, database: Database
) -> None:
    job = submit(client)
    before = redis_client.llen(settings.queue)
    paused = client.post(f"/v1/jobs/{job['id']}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert redis_client.llen(settings.queue) == before  # nothing sent for a paused job
    with database.session() as session:
        row = session.get(Job, job["id"])
        assert row is not None and (row.status, row.enqueued_at) == ("paused", None)
    assert client.post(f"/v1/jobs/{job['id']}/pause").json()["status"] == "paused"  # idempotent

    resumed = client.post(f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert redis_client.llen(settings.queue) == before + 1
    message = json.loads(redis_client.lindex(settings.queue, 0))  # type: ignore[arg-type]
    assert message["headers"]["argsrepr"] == repr([job["id"]])
    statuses = [
        event["data"]["status"]
        for event in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        if event["type"] == "status"
    ]
    assert statuses[-2:] == ["paused", "queued"]
    # Resuming a queued job changes nothing and sends nothing.
    assert client.post(f"/v1/jobs/{job['id']}/resume").json()["status"] == "queued"
    assert redis_client.llen(settings.queue) == before + 1


def test_pause_of_a_running_job_is_pausing_and_resume_lets_it_run_on(
    client: TestClient, database: Database
) -> None:
    job = submit(client)
    with database.session() as session:
        runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        session.commit()
    response = client.post(f"/v1/jobs/{job['id']}/pause")
    assert response.status_code == 200 and response.json()["status"] == "pausing"
    with database.session() as session:
        row = session.get(Job, job["id"])
        assert row is not None and row.release_requested and row.release_reason == "pause"
    resumed = client.post(f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    with database.session() as session:
        row = session.get(Job, job["id"])
        assert row is not None and not row.release_requested


def test_pause_and_resume_of_a_finished_or_missing_job_are_409_and_404(
    client: TestClient,
) -> None:
    job = submit(client)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    for verb in ("pause", "resume"):
        response = client.post(f"/v1/jobs/{job['id']}/{verb}")
        assert response.status_code == 409, verb
        error = response.json()["error"]
        assert error["type"] == "job_finished" and "cancelled" in error["message"]
        missing = client.post(f"/v1/jobs/job_000000000000000000000000/{verb}")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_metrics_and_events_have_their_documented_shapes(
    client: TestClient, database: Database
) -> None:
    job = submit(client)
    with database.session() as session:
        claim = runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        assert claim is not None
        metrics = [
            {"step": s, "loss": 1.0, "lr": 0.1, "grad_norm": 0.2, "samples_per_sec": 50.0,
             "micro_batch_size": 4, "time": time.time()}
            for s in (1, 2, 3)
        ]  # fmt: skip
        runs.record_progress(session, claim=claim, job_values={"step": 3}, metrics=metrics,
                             events=[("overflow_skip", {"step": 2, "scale": 1024.0})])  # fmt: skip
        session.commit()
    page = client.get(f"/v1/jobs/{job['id']}/metrics", params={"after_step": 1, "limit": 1}).json()
    assert page["has_more"] is True
    assert {"step", "loss", "lr", "grad_norm", "samples_per_sec", "micro_batch_size",
            "time"} <= set(page["data"][0])  # fmt: skip
    assert page["data"][0]["step"] == 2
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    types = ["status", "status", "metrics", "metrics", "metrics", "overflow_skip"]
    assert [e["type"] for e in events["data"]] == types
    assert set(events["data"][0]) == {"id", "type", "created_at", "data"}
    assert [e["data"]["step"] for e in events["data"][2:5]] == [1, 2, 3]  # a step each
    assert set(events["data"][2]["data"]) >= {"step", "loss", "lr", "samples_per_sec", "time"}
    after = client.get(f"/v1/jobs/{job['id']}/events", params={"after": events["data"][4]["id"]})
    assert [e["type"] for e in after.json()["data"]] == ["overflow_skip"]
    only = client.get(f"/v1/jobs/{job['id']}/events", params={"type": ["status", "overflow_skip"]})
    assert [e["type"] for e in only.json()["data"]] == ["status", "status", "overflow_skip"]
    assert client.get("/v1/jobs/job_000000000000000000000000/events").status_code == 404


def test_attempts_list_every_run_of_the_job_oldest_first(
    client: TestClient, database: Database
) -> None:
    job = submit(client)
    with database.session() as session:
        first = runs.claim_job(session, job_id=job["id"], worker="w1", lease_timeout=60)
        assert first is not None
        runs.hand_back(session, claim=first, reason="shutdown", counted=False)
        runs.claim_job(session, job_id=job["id"], worker="w2", lease_timeout=60)
        session.execute(  # w2 stops renewing its lease
            update(Job)
            .where(Job.id == job["id"])
            .values(heartbeat_at=utcnow() - timedelta(seconds=120))
        )
        runs.claim_job(session, job_id=job["id"], worker="w3", lease_timeout=60)
        session.commit()

    page = client.get(f"/v1/jobs/{job['id']}/attempts").json()
    assert set(page) == {"data", "has_more"} and page["has_more"] is False
    assert all(set(row) == ATTEMPT_FIELDS for row in page["data"])
    assert [(r["attempt"], r["worker"], r["reason"], r["counted"]) for r in page["data"]] == [
        (1, "w1", "shutdown", False), (2, "w2", "worker_lost", True), (3, "w3", None, True),
    ]  # fmt: skip
    assert [r["resumed_from_step"] for r in page["data"]] == [0, 0, 0]
    assert page["data"][0]["ended_at"] and page["data"][2]["ended_at"] is None
    assert page["data"][0]["started_at"].endswith("+00:00")  # times say they are UTC
    current = client.get(f"/v1/jobs/{job['id']}").json()
    assert (current["status"], current["worker"], current["attempts"]) == ("running", "w3", 2)

    first_page = client.get(f"/v1/jobs/{job['id']}/attempts", params={"limit": 2}).json()
    assert [r["attempt"] for r in first_page["data"]] == [1, 2] and first_page["has_more"]
    rest = client.get(f"/v1/jobs/{job['id']}/attempts", params={"after": 2, "limit": 2}).json()
    assert [r["attempt"] for r in rest["data"]] == [3] and rest["has_more"] is False


def test_attempts_of_an_unknown_job_are_404_and_bad_pages_422(client: TestClient) -> None:
    missing = client.get("/v1/jobs/job_000000000000000000000000/attempts")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    job = submit(client)
    assert client.get(f"/v1/jobs/{job['id']}/attempts").json() == {"data": [], "has_more": False}
    for params in ({"limit": 0}, {"limit": 101}, {"after": -1}):
        response = client.get(f"/v1/jobs/{job['id']}/attempts", params=params)
        assert response.status_code == 422 and "error" in response.json()


def test_submit_with_the_broker_away_keeps_the_job_queued_for_the_reaper(
    settings: Settings, database: Database
) -> None:
    away = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "reaper_interval_seconds": 0}
    )
    with TestClient(create_app(away)) as client:
        started = time.monotonic()
        job = submit(client)
        assert time.monotonic() - started < 5  # the publish retries briefly, then gives up
        assert job["status"] == "queued"
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    with database.session() as session:
        stored = session.get(Job, job["id"])
        assert stored is not None and stored.status == "queued"
        assert stored.enqueued_at is None  # the reaper's next pass sends it
