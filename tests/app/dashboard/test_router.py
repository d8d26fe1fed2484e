"""The dashboard's JSON against the real database and Redis, and its page's files.

The session's database is shared with other tests, so counts are compared before and
after this test's own jobs, never as absolute numbers.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.auth import service as auth_service
from app.db import Database, upgrade, utcnow
from app.jobs import runs
from app.jobs.models import Job
from app.main import create_app
from app.settings import Settings
from tests.app.jobs.helpers import claim, create, metric
from tests.conftest import REDIS_URL
from worker.presence import presence_key

STATUSES = {
    "queued", "running", "cancelling", "pausing", "paused", "succeeded", "failed", "cancelled"
}  # fmt: skip
RUNNING_FIELDS = {
    "id", "name", "status", "priority", "progress", "batch_size", "micro_batch_size",
    "accumulation_steps", "loss", "samples_per_sec", "worker", "started_at",
}  # fmt: skip
WORKER_FIELDS = {
    "name", "hostname", "pid", "device", "cuda_visible_devices", "queues", "concurrency",
    "job_id", "started_at", "last_seen",
}  # fmt: skip
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'"
)


def dashboard(client: TestClient, **headers: str) -> dict[str, Any]:
    response = client.get("/v1/dashboard", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def running_job(
    database: Database, worker: str, *, loss_at_step: int = 4, window_samples: int = 8
) -> str:
    """A claimed job with a few steps of progress: loss, samples/s and window size set."""
    job_id = create(database, name="dash-running")
    taken = claim(database, job_id, worker)
    step_metrics = {**metric(loss_at_step), "window_samples": window_samples}
    with database.session() as session:
        runs.record_progress(
            session,
            claim=taken,
            job_values={"step": loss_at_step, "metrics": step_metrics},
            metrics=[],
            events=[],
        )
        session.commit()
    return job_id


def finish(database: Database, job_id: str, status: str, *, ago: timedelta) -> None:
    with database.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status=status, finished_at=utcnow() - ago)
        )
        session.commit()


@pytest.fixture
def announced(redis_client: redis.Redis) -> Iterator[Callable[..., str]]:
    """Writes fake worker presence keys (as worker/presence.py does); deletes them after."""
    names: list[str] = []

    def write(**fields: Any) -> str:
        name = f"trainjob-{secrets.token_hex(3)}@dash-test"
        record = {
            "name": name, "hostname": "dash-test", "pid": 4242, "device": "cuda",
            "cuda_visible_devices": "1", "queues": ["gpu"],
            "started_at": "2026-11-26T08:00:00+00:00", "last_seen": utcnow().isoformat(),
        } | fields  # fmt: skip
        redis_client.set(presence_key(name), json.dumps(record), ex=60)
        names.append(name)
        return name

    yield write
    for name in names:
        redis_client.delete(presence_key(name))


def test_the_dashboard_has_every_status_the_queue_depth_and_the_time(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    body = dashboard(client)
    assert set(body) == {
        "counts", "queue_depth", "running", "queue", "paused", "tenants", "workers",
        "finished_last_hour", "time",
    }  # fmt: skip
    assert set(body["counts"]) == STATUSES
    assert all(isinstance(count, int) for count in body["counts"].values())
    assert body["queue_depth"] == redis_client.llen(settings.queue)
    assert set(body["finished_last_hour"]) == {"succeeded", "failed", "cancelled"}
    assert body["time"].endswith("+00:00")


def test_counts_move_with_submitted_cancelled_and_claimed_jobs(
    client: TestClient, database: Database, settings: Settings, redis_client: redis.Redis
) -> None:
    before = dashboard(client)
    spec = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 4,
            "accumulation_steps": 2, "max_steps": 3}  # fmt: skip
    for _ in range(2):
        assert client.post("/v1/jobs", json=spec).status_code == 201
    cancelled = create(database)
    assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 200
    running_job(database, "trainjob-1@dash")

    after = dashboard(client)
    delta = {status: after["counts"][status] - before["counts"][status] for status in STATUSES}
    # Two submitted and one claimed from a created job (created jobs start queued).
    assert delta == {"queued": 2, "running": 1, "cancelling": 0, "pausing": 0, "paused": 0,
                     "succeeded": 0, "failed": 0, "cancelled": 1}  # fmt: skip
    assert after["queue_depth"] == before["queue_depth"] + 2 == redis_client.llen(settings.queue)
    assert after["finished_last_hour"]["cancelled"] == before["finished_last_hour"]["cancelled"] + 1


def test_running_jobs_come_newest_first_with_progress_batch_loss_and_worker(
    client: TestClient, database: Database
) -> None:
    older = running_job(database, "trainjob-11@dash")
    # Its latest step was an epoch's short last window: 3 of the batch's 8 samples.
    newer = running_job(database, "trainjob-12@dash", loss_at_step=5, window_samples=3)
    assert client.post(f"/v1/jobs/{older}/cancel").json()["status"] == "cancelling"
    queued = create(database)

    running = dashboard(client)["running"]
    ids = [job["id"] for job in running]
    assert ids.index(newer) < ids.index(older) and queued not in ids
    assert ids == sorted(ids, reverse=True) and len(ids) <= 100
    entry = running[ids.index(newer)]
    assert set(entry) == RUNNING_FIELDS
    assert entry["status"] == "running" and entry["worker"] == "trainjob-12@dash"
    assert entry["progress"] == {"step": 5, "max_steps": 10, "epoch": 0, "samples_seen": 0,
                                 "tokens_seen": 0, "last_window_samples": 3}  # fmt: skip
    batch = (entry["batch_size"], entry["micro_batch_size"], entry["accumulation_steps"])
    assert batch == (8, 8, 1)
    assert entry["loss"] == pytest.approx(1 / 5) and entry["samples_per_sec"] == 100.0
    assert entry["started_at"] is not None and entry["started_at"].endswith("+00:00")
    assert running[ids.index(older)]["status"] == "cancelling"


def test_finished_last_hour_counts_only_the_last_hour_by_outcome(
    client: TestClient, database: Database
) -> None:
    before = dashboard(client)["finished_last_hour"]
    for status, ago in [
        ("succeeded", timedelta(minutes=5)),
        ("succeeded", timedelta(minutes=59)),
        ("failed", timedelta(minutes=1)),
        ("cancelled", timedelta(minutes=30)),
        ("succeeded", timedelta(minutes=61)),  # too old
        ("failed", timedelta(hours=5)),  # too old
    ]:
        finish(database, create(database), status, ago=ago)
    after = dashboard(client)["finished_last_hour"]
    assert {key: after[key] - before[key] for key in after} == {
        "succeeded": 2, "failed": 1, "cancelled": 1,
    }  # fmt: skip


def test_workers_are_read_from_live_presence_keys_with_their_running_job(
    client: TestClient, database: Database, announced: Callable[..., str]
) -> None:
    busy = announced()
    idle = announced(device="cpu", cuda_visible_devices=None)
    job_id = running_job(database, busy)

    workers = {worker["name"]: worker for worker in dashboard(client)["workers"]}
    assert set(workers[busy]) == WORKER_FIELDS
    assert workers[busy]["job_id"] == job_id
    assert (workers[busy]["device"], workers[busy]["cuda_visible_devices"]) == ("cuda", "1")
    assert workers[busy]["queues"] == ["gpu"] and workers[busy]["pid"] == 4242
    assert workers[busy]["concurrency"] == 1  # a record without it: written before it existed
    assert workers[idle]["job_id"] is None and workers[idle]["device"] == "cpu"


def test_an_expired_or_unreadable_presence_key_is_not_a_worker(
    client: TestClient, redis_client: redis.Redis, announced: Callable[..., str]
) -> None:
    gone = announced()
    redis_client.delete(presence_key(gone))  # as when its TTL runs out
    broken = presence_key(f"trainjob-0@broken-{secrets.token_hex(3)}")
    redis_client.set(broken, "not json", ex=60)
    partial = presence_key(f"trainjob-0@partial-{secrets.token_hex(3)}")
    redis_client.set(partial, json.dumps({"name": "half"}), ex=60)
    try:
        names = {worker["name"] for worker in dashboard(client)["workers"]}
    finally:
        redis_client.delete(broken, partial)
    assert gone not in names and "half" not in names


def test_root_redirects_to_the_dashboard(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/dashboard"


def test_the_page_is_html_with_a_strict_content_security_policy(client: TestClient) -> None:
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    page = response.text
    assert '<script type="module" src="/static/dashboard/dashboard.js"></script>' in page
    # The CSP allows no inline script or style: the page must not need any.
    assert "<style" not in page and "style=" not in page and "onclick" not in page
    for element_id in ('id="loss-chart"', 'id="cancel"', 'id="job-status"', 'id="jobs-body"'):
        assert element_id in page


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("dashboard.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("chart.js", "text/javascript"),
        ("dashboard.css", "text/css"),
    ],
)
def test_the_page_s_files_are_served_with_their_type_and_nosniff(
    client: TestClient, name: str, content_type: str
) -> None:
    response = client.get(f"/static/dashboard/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert len(response.content) > 500


def test_the_modules_the_page_imports_are_all_served(client: TestClient) -> None:
    script = client.get("/static/dashboard/dashboard.js").text
    for module in ("./api.js", "./chart.js"):
        assert f'from "{module}"' in script
    assert "innerHTML" not in script  # every value is written as text


@pytest.mark.parametrize("name", ["index.html", "../router.py", "nope.js", "%2e%2e%2fservice.py"])
def test_only_the_listed_files_are_served(client: TestClient, name: str) -> None:
    response = client.get(f"/static/dashboard/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_a_tenant_sees_only_its_own_jobs_and_no_other_tenant_s_job_on_a_worker(
    make_postgres_database: Callable[[], str],
    queue_name: str,
    tmp_path: Path,
    announced: Callable[..., str],
) -> None:
    # A database of its own: auth turns on for a database once any key exists.
    url = make_postgres_database()
    upgrade(url)
    database = Database(url)
    with database.session() as session:
        _, acme = auth_service.create_key(session, tenant="acme", admin=False)
        _, admin = auth_service.create_key(session, tenant="ops", admin=True)
        session.commit()
    settings = Settings(
        home=tmp_path / "home", database_url=url, redis_url=REDIS_URL,
        queue=f"{queue_name}-dash-auth", reaper_interval_seconds=0,
    )  # fmt: skip
    worker = announced()
    other_tenant_job = running_job(database, worker)  # created as the default tenant
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/dashboard").status_code == 401
            mine = dashboard(client, authorization=f"Bearer {acme}")
            everything = dashboard(client, authorization=f"Bearer {admin}")
    finally:
        database.dispose()
    assert mine["counts"]["running"] == 0 and mine["running"] == []
    assert [tenant["name"] for tenant in mine["tenants"]] == ["acme"]  # its own, even idle
    assert mine["tenants"][0]["running_devices"] == 0
    assert [tenant["name"] for tenant in everything["tenants"]] == ["default"]
    assert everything["tenants"][0]["running_devices"] == 1
    assert {w["name"]: w["job_id"] for w in mine["workers"]}[worker] is None
    assert everything["counts"]["running"] == 1
    assert [job["id"] for job in everything["running"]] == [other_tenant_job]
    assert {w["name"]: w["job_id"] for w in everything["workers"]}[worker] == other_tenant_job


def test_the_queue_s_head_in_claim_order_paused_jobs_and_tenants_usage(
    make_postgres_database: Callable[[], str], queue_name: str, tmp_path: Path
) -> None:
    # A database of its own: the queue's head is the first jobs of the whole table.
    url = make_postgres_database()
    upgrade(url)
    database = Database(url)
    settings = Settings(
        home=tmp_path / "home", database_url=url, redis_url=REDIS_URL,
        queue=f"{queue_name}-dash-queue", reaper_interval_seconds=0,
    )  # fmt: skip
    low, high, middle = (create(database, priority=p, name=f"p{p}") for p in (100, 900, 500))
    two_devices = create(database, priority=50, devices=2, micro_batch_size=4)
    paused = create(database, priority=700)
    running = running_job(database, "trainjob-2@dash")
    with database.session() as session:
        session.execute(update(Job).where(Job.id == paused).values(status="paused"))
        session.execute(update(Job).where(Job.id == low).values(tenant="acme"))
        session.commit()
    try:
        with TestClient(create_app(settings)) as client:
            body = dashboard(client)
    finally:
        database.dispose()
    queue = [(job["id"], job["queue_position"], job["priority"]) for job in body["queue"]]
    # Each device count is a queue of its own: the two-device job is first of its queue.
    assert queue == [(high, 0, 900), (two_devices, 0, 50), (middle, 1, 500), (low, 2, 100)]
    assert body["queue"][3]["tenant"] == "acme" and body["queue"][1]["devices"] == 2
    assert [(job["id"], job["status"], job["priority"]) for job in body["paused"]] == [
        (paused, "paused", 700)
    ]
    assert body["counts"]["paused"] == 1
    assert [job["id"] for job in body["running"]] == [running]
    usage = {tenant["name"]: tenant for tenant in body["tenants"]}
    assert set(usage) == {"acme", "default"}
    assert (usage["acme"]["queued_jobs"], usage["acme"]["running_devices"]) == (1, 0)
    assert (usage["default"]["queued_jobs"], usage["default"]["running_devices"]) == (3, 1)
    assert usage["default"]["device_seconds_recent"] >= 0
