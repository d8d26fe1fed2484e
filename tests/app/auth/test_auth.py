"""API keys and tenants: nobody gets in without a key, nobody sees another tenant's jobs.

Each test gets a database of its own: auth turns on for a database once any key exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth import service as auth_service
from app.db import Database, upgrade
from app.jobs import runs
from app.main import create_app
from app.settings import Settings
from tests.conftest import REDIS_URL

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 4,
        "accumulation_steps": 2, "max_steps": 3}  # fmt: skip


@dataclass
class Keys:
    a: str
    b: str
    admin: str
    revoked: str

    def header(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}


def make_settings(database: Database, queue_name: str, tmp_path: Path, **changes: Any) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=database.url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-auth",
        reaper_interval_seconds=0,
        **changes,
    )


@pytest.fixture
def keys(own_database: Database) -> Keys:
    with own_database.session() as session:
        _, a = auth_service.create_key(session, tenant="acme", admin=False)
        _, b = auth_service.create_key(session, tenant="bravo", admin=False)
        _, admin = auth_service.create_key(session, tenant="ops", admin=True)
        revoked_row, revoked = auth_service.create_key(session, tenant="acme", admin=False)
        auth_service.revoke_key(session, key_id=revoked_row.id)
        session.commit()
    return Keys(a, b, admin, revoked)


@pytest.fixture
def client(
    own_database: Database, keys: Keys, queue_name: str, tmp_path: Path
) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(own_database, queue_name, tmp_path))) as test_client:
        yield test_client


def test_without_a_key_or_with_a_revoked_or_bogus_one_it_is_401(
    client: TestClient, keys: Keys
) -> None:
    for headers in (
        {},
        keys.header(keys.revoked),
        keys.header("tjk_000000000000_" + "x" * 43),
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Bearer"},
    ):
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/jobs", json=SPEC).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_another_tenant_can_neither_see_nor_touch_a_job(
    client: TestClient, keys: Keys, own_database: Database
) -> None:
    job = client.post("/v1/jobs", json=SPEC, headers=keys.header(keys.a)).json()
    assert job["tenant"] == "acme"
    with own_database.session() as session:  # give it a checkpoint, so weights exist
        taken = runs.claim_job(session, job_id=job["id"], worker="w", lease_timeout=60)
        assert taken is not None
        session.commit()
    as_b = keys.header(keys.b)
    for method, path in (
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("GET", "/events"),
        ("GET", "/events/stream"),
        ("GET", "/metrics"),
        ("GET", "/attempts"),
        ("GET", "/checkpoints"),
        ("GET", "/weights"),
    ):
        response = client.request(method, f"/v1/jobs/{job['id']}{path}", headers=as_b)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found"
    streamed = client.get(
        f"/v1/jobs/{job['id']}/events", headers=as_b | {"accept": "text/event-stream"}
    )
    assert streamed.status_code == 404
    assert client.get("/v1/jobs", headers=as_b).json()["data"] == []
    assert client.get("/v1/jobs?status=running", headers=as_b).json()["data"] == []
    mine = client.get("/v1/jobs", headers=keys.header(keys.a)).json()["data"]
    assert [j["id"] for j in mine] == [job["id"]]
    everything = client.get("/v1/jobs", headers=keys.header(keys.admin)).json()["data"]
    assert [j["id"] for j in everything] == [job["id"]]
    cancel = client.post(f"/v1/jobs/{job['id']}/cancel", headers=keys.header(keys.a))
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelling"


def test_prometheus_metrics_need_an_admin_key(client: TestClient, keys: Keys) -> None:
    assert client.get("/metrics").status_code == 401
    forbidden = client.get("/metrics", headers=keys.header(keys.a))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "forbidden"
    assert client.get("/metrics", headers=keys.header(keys.admin)).status_code == 200


def test_a_revoked_key_is_refused_at_once(client: TestClient, own_database: Database) -> None:
    with own_database.session() as session:
        row, key = auth_service.create_key(session, tenant="acme", admin=False)
        session.commit()
    headers = {"authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with own_database.session() as session:
        auth_service.revoke_key(session, key_id=row.id)
        session.commit()
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_the_same_idempotency_key_and_body_is_one_job(client: TestClient, keys: Keys) -> None:
    as_a = keys.header(keys.a) | {"idempotency-key": "submit-42"}
    first = client.post("/v1/jobs", json=SPEC, headers=as_a)
    again = client.post("/v1/jobs", json=dict(reversed(SPEC.items())), headers=as_a)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]

    other = client.post("/v1/jobs", json=SPEC | {"max_steps": 4}, headers=as_a)
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "idempotency_key_reused"

    # Keys belong to a tenant: the same key from another tenant is another job.
    as_b = keys.header(keys.b) | {"idempotency-key": "submit-42"}
    theirs = client.post("/v1/jobs", json=SPEC, headers=as_b)
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/jobs", headers=keys.header(keys.admin)).json()["data"]) == 2


def test_a_tenant_at_its_cap_gets_429_with_retry_after(
    own_database: Database, keys: Keys, queue_name: str, tmp_path: Path
) -> None:
    settings = make_settings(own_database, queue_name, tmp_path, max_active_jobs_per_tenant=2)
    with TestClient(create_app(settings)) as client:
        as_a = keys.header(keys.a)
        first = client.post("/v1/jobs", json=SPEC, headers=as_a).json()
        assert client.post("/v1/jobs", json=SPEC, headers=as_a).status_code == 201
        refused = client.post("/v1/jobs", json=SPEC, headers=as_a)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert refused.json()["error"]["type"] == "too_many_jobs"
        assert client.post("/v1/jobs", json=SPEC, headers=keys.header(keys.b)).status_code == 201
        client.post(f"/v1/jobs/{first['id']}/cancel", headers=as_a)  # frees a place
        assert client.post("/v1/jobs", json=SPEC, headers=as_a).status_code == 201


def test_no_cors_by_default_and_only_the_listed_origins_when_set(
    own_database: Database, keys: Keys, queue_name: str, tmp_path: Path
) -> None:
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    with TestClient(create_app(make_settings(own_database, queue_name, tmp_path))) as client:
        response = client.options("/v1/jobs", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    allowed = make_settings(
        own_database, queue_name, tmp_path, cors_origins=["https://tools.example"]
    )
    with TestClient(create_app(allowed)) as client:
        good = client.options("/v1/jobs", headers=preflight | {"origin": "https://tools.example"})
        assert good.headers["access-control-allow-origin"] == "https://tools.example"
        bad = client.options("/v1/jobs", headers=preflight)
        assert "access-control-allow-origin" not in bad.headers


def test_keys_are_stored_as_hashes_only(own_database: Database, keys: Keys) -> None:
    with own_database.session() as session:
        stored = auth_service.list_keys(session)
    everything = " ".join(f"{row.id} {row.key_hash} {row.name}" for row in stored)
    for key in (keys.a, keys.b, keys.admin):
        assert key not in everything and key.split("_", 2)[2] not in everything


def test_auth_is_off_without_keys_and_says_so(
    tmp_path: Path, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'open.db'}"
    upgrade(url)
    database = Database(url)
    try:
        with TestClient(create_app(make_settings(database, queue_name, tmp_path))) as client:
            assert client.get("/v1/jobs").status_code == 200
        assert "authentication is OFF" in caplog.text
        required = make_settings(database, queue_name, tmp_path, auth="required")
        with TestClient(create_app(required)) as client:
            assert client.get("/v1/jobs").status_code == 401
    finally:
        database.dispose()
