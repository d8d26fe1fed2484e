"""Fair share with a real API and two real workers: tenant A submits 20 jobs, then tenant B
20; B does not wait behind all of A's, and over the run both use about the same
device-seconds.

Jobs of one priority are ordered by their tenant's device-seconds in the fair-share window
(app/jobs/scheduling.py): once A runs two jobs, the next free worker takes B's first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from app.auth import service as auth_service
from app.db import Database, upgrade
from tests.conftest import REDIS_URL
from tests.processes import (
    FAST_TIMINGS,
    RESUMABLE_SPEC,
    api_and_worker,
    running,
    service_env,
    wait_for,
)

JOBS_EACH = 20
# Each job: 4 steps of 2 micro-batches at 0.02 s (the `slow` fault): its run time is
# mostly these sleeps, so that both tenants' jobs cost alike.
SPEC: dict[str, Any] = {**RESUMABLE_SPEC, "max_steps": 4, "checkpoint_every": 0}
FAULTS = {"TRAINJOB_TEST_FAULTS": "slow=0.02"}


@pytest.fixture(scope="module")
def service(
    make_postgres_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
    queue_name: str,
) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    database_url = make_postgres_database()
    upgrade(database_url)
    database = Database(database_url)
    with database.session() as session:
        keys = {
            tenant: auth_service.create_key(session, tenant=tenant, admin=False)[1]
            for tenant in ("a", "b")
        }
        session.commit()
    database.dispose()
    logs = tmp_path_factory.mktemp("fair-share")
    settings = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "queue": f"{queue_name}-fair",
        "home": str(logs / "home"),
        **FAST_TIMINGS,
    }
    with contextlib.ExitStack() as stack:
        second = service_env(**settings) | FAULTS
        stack.enter_context(running(["worker"], second, logs / "worker-2.log"))
        client = stack.enter_context(api_and_worker(logs, worker_env=FAULTS, **settings))
        yield client, keys


def test_a_later_tenant_is_not_starved_and_both_use_a_like_share(
    service: tuple[httpx.Client, dict[str, str]],
) -> None:
    client, keys = service

    def submit(tenant: str, index: int) -> str:
        headers = {"authorization": f"Bearer {keys[tenant]}"}
        response = client.post(
            "/v1/jobs", json={**SPEC, "name": f"{tenant}{index}"}, headers=headers
        )
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    ids = {tenant: [submit(tenant, i) for i in range(JOBS_EACH)] for tenant in ("a", "b")}

    def all_finished() -> dict[str, list[dict[str, Any]]] | None:
        done: dict[str, list[dict[str, Any]]] = {}
        for tenant, job_ids in ids.items():
            headers = {"authorization": f"Bearer {keys[tenant]}"}
            jobs = [client.get(f"/v1/jobs/{job_id}", headers=headers).json() for job_id in job_ids]
            if any(job["status"] not in ("succeeded", "failed", "cancelled") for job in jobs):
                return None
            done[tenant] = jobs
        return done

    finished = wait_for(all_finished, 300, "all 40 jobs to finish", interval=0.5)
    for jobs in finished.values():
        assert all(job["status"] == "succeeded" for job in jobs), [job["error"] for job in jobs]

    def started(job: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(job["started_at"])

    a_starts = sorted(started(job) for job in finished["a"])
    b_first = min(started(job) for job in finished["b"])
    assert b_first < a_starts[2], "B's first job waited behind A's third"

    def device_seconds(tenant: str) -> float:
        headers = {"authorization": f"Bearer {keys[tenant]}"}
        total = 0.0
        for job_id in ids[tenant]:
            runs = client.get(f"/v1/jobs/{job_id}/attempts", headers=headers).json()["data"]
            for run in runs:
                ended = datetime.fromisoformat(run["ended_at"])
                total += (ended - datetime.fromisoformat(run["started_at"])).total_seconds()
        return total

    a_used, b_used = device_seconds("a"), device_seconds("b")
    assert abs(a_used - b_used) <= 0.2 * max(a_used, b_used), (a_used, b_used)
