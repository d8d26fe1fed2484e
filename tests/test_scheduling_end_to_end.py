"""Scheduling with a real API and one real worker: the database's order, pause and resume.

The worker runs one job at a time and injects `slow` (a pause per micro-batch, weights
unchanged), so that a job is still running when the test acts on it. Final weights are
compared byte for byte with an undisturbed `trainjob run` of the same spec.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import StartService, wait_for
from tests.processes import FAST_TIMINGS, RESUMABLE_SPEC, trainjob_run, wait_for_status

FINISHED = {"succeeded", "failed", "cancelled"}
# A short job (3 steps) and one that runs until cancelled.
SHORT: dict[str, Any] = {**RESUMABLE_SPEC, "max_steps": 3, "checkpoint_every": 0}
ENDLESS: dict[str, Any] = {**SHORT, "max_steps": 1_000_000}
# 60 steps of 2 micro-batches at 0.05 s each: about 6 s of training, so that a pause
# asked at step 10 lands mid-run.
SLOW = "slow=0.05"


@pytest.fixture(scope="module")
def client(start_service: StartService) -> Iterator[httpx.Client]:
    faults = {"TRAINJOB_TEST_FAULTS": SLOW}
    with start_service("scheduling", worker_env=faults, **FAST_TIMINGS) as service:
        yield service


def submit(client: httpx.Client, spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**spec, **changes})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def get(client: httpx.Client, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return job


def wait_for_step(client: httpx.Client, job_id: str, at_least: int) -> dict[str, Any]:
    def trained() -> dict[str, Any] | None:
        job = get(client, job_id)
        assert job["status"] not in FINISHED, job
        running = job["status"] == "running" and job["progress"]["step"] >= at_least
        return job if running else None

    found: dict[str, Any] = wait_for(trained, 60, f"job {job_id} at step {at_least}", 0.05)
    return found


def statuses(client: httpx.Client, job_id: str) -> list[str]:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [event["data"]["status"] for event in events if event["type"] == "status"]


def test_queued_jobs_start_by_priority_not_by_submit_order(client: httpx.Client) -> None:
    blocker = submit(client, ENDLESS, name="blocker", priority=100)
    wait_for_step(client, blocker["id"], 1)
    # Sent in this order: the messages name 100 first, the database picks 900.
    waiting = [submit(client, SHORT, name=f"p{p}", priority=p) for p in (100, 900, 500)]
    assert all(get(client, job["id"])["status"] == "queued" for job in waiting)
    client.post(f"/v1/jobs/{blocker['id']}/cancel")
    done = [wait_for_status(client, job["id"], FINISHED, timeout=90) for job in waiting]
    assert all(job["status"] == "succeeded" for job in done), [job["error"] for job in done]
    started = sorted(done, key=lambda job: datetime.fromisoformat(job["started_at"]))
    assert [job["priority"] for job in started] == [900, 500, 100]
    assert wait_for_status(client, blocker["id"], FINISHED, timeout=30)["status"] == "cancelled"


def test_a_paused_job_frees_its_worker_and_resumes_to_the_same_weights(
    client: httpx.Client, tmp_path: Path
) -> None:
    reference = trainjob_run(RESUMABLE_SPEC, tmp_path / "reference", timeout=120)
    job = submit(client, RESUMABLE_SPEC, name="paused mid-run")
    wait_for_step(client, job["id"], 10)

    # A job submitted behind it and paused is paused at once, and never taken.
    queued = submit(client, SHORT, name="paused while queued")
    answer = client.post(f"/v1/jobs/{queued['id']}/pause")
    assert answer.status_code == 200 and answer.json()["status"] == "paused"

    pausing = client.post(f"/v1/jobs/{job['id']}/pause")
    assert pausing.status_code == 200 and pausing.json()["status"] == "pausing"
    paused = wait_for_status(client, job["id"], {"paused", *FINISHED}, timeout=30)
    assert paused["status"] == "paused" and paused["worker"] is None
    assert 10 <= paused["progress"]["step"] < RESUMABLE_SPEC["max_steps"]
    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert max(c["step"] for c in checkpoints) == paused["progress"]["step"]

    # The worker is free: another job runs to the end while these two are paused.
    other = submit(client, SHORT, name="runs meanwhile")
    assert wait_for_status(client, other["id"], FINISHED, timeout=60)["status"] == "succeeded"
    assert get(client, job["id"])["status"] == "paused"
    untouched = get(client, queued["id"])
    assert (untouched["status"], untouched["started_at"]) == ("paused", None)

    for paused_job in (job, queued):
        resumed = client.post(f"/v1/jobs/{paused_job['id']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    done = wait_for_status(client, job["id"], FINISHED, timeout=90)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1  # the paused run is not counted
    first, second = client.get(f"/v1/jobs/{job['id']}/attempts").json()["data"]
    assert (first["reason"], first["counted"]) == ("paused", False)
    assert second["resumed_from_step"] == paused["progress"]["step"]
    assert statuses(client, job["id"])[-5:] == [
        "pausing", "paused", "queued", "running", "succeeded"
    ]  # fmt: skip
    weights = client.get(f"/v1/jobs/{job['id']}/weights")
    assert weights.status_code == 200 and weights.content == reference
    assert wait_for_status(client, queued["id"], FINISHED, timeout=60)["status"] == "succeeded"
