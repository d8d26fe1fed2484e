"""The whole service with real processes: API and worker as subprocesses, Postgres, Redis.

A job submitted by HTTP trains on a worker to the same weights `trainjob run` gives,
and a running job cancelled by HTTP stops at its next step with a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import StartService
from tests.processes import trainjob_run, wait_for_status

SPEC: dict[str, Any] = {
    "model": {"type": "tiny-gpt", "n_layer": 1, "n_embd": 32, "block_size": 64},
    "dataset": {"type": "tiny-text"},
    "micro_batch_size": 4,
    "accumulation_steps": 3,
    "max_steps": 12,
    "checkpoint_every": 5,
    "optimizer": {"type": "adamw", "lr": 0.003},
    "lr_schedule": {"type": "cosine", "warmup_steps": 2},
    "device": "cpu",
}


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service("e2e", progress_flush_seconds="0.2") as client:
        yield client


def test_submitted_job_succeeds_with_the_weights_of_trainjob_run(
    service: httpx.Client, tmp_path: Path
) -> None:
    job = service.post("/v1/jobs", json=SPEC).json()
    done = wait_for_status(service, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["step"] == 12 and done["progress"]["max_steps"] == 12
    assert done["attempts"] == 1 and done["started_at"] and done["finished_at"]
    assert done["progress"]["tokens_seen"] > 0 and done["metrics"]["loss"] > 0

    metrics = service.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    checkpoints = service.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [5, 10, 12]
    events = [e["type"] for e in service.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert (
        events[:2] == ["status", "status"]
        and events[-1] == "status"
        and events.count("checkpoint") == 3
    )

    downloaded = service.get(f"/v1/jobs/{job['id']}/weights")
    assert downloaded.status_code == 200
    assert downloaded.content == trainjob_run(SPEC, tmp_path, timeout=120)


def test_running_job_cancelled_by_http_stops_with_a_checkpoint(service: httpx.Client) -> None:
    long = {**SPEC, "model": {"type": "mlp", "hidden_sizes": [8]}, "dataset": {"type": "digits"},
            "max_steps": 1_000_000, "checkpoint_every": 0}  # fmt: skip
    job = service.post("/v1/jobs", json=long).json()

    def training() -> bool:
        current = service.get(f"/v1/jobs/{job['id']}").json()
        return current["status"] == "running" and current["progress"]["step"] > 0

    from tests.conftest import wait_for

    wait_for(training, 60, "the job to train", interval=0.1)
    response = service.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelling"
    done = wait_for_status(service, job["id"], {"cancelled", "succeeded", "failed"}, timeout=5)
    assert done["status"] == "cancelled"
    checkpoints = service.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == done["progress"]["step"]
    assert service.get(f"/v1/jobs/{job['id']}/weights").status_code == 200
