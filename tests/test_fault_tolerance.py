"""Fault tolerance with real processes: workers killed, stopped, duplicated, Redis restarted.

An API process (which runs the reaper) and `trainjob worker` processes share a fresh
Postgres database. Timings are shortened (heartbeat 0.2 s, lease 2 s) and workers
inject `slow` (a pause per micro-batch, weights unchanged) so that a job can be
interrupted mid-run. Final weights are compared byte for byte with `trainjob run`.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from app.db import upgrade
from app.queue import enqueue_training
from app.settings import Settings
from tests.conftest import wait_for
from tests.processes import (
    FAST_TIMINGS,
    RESUMABLE_SPEC,
    free_port,
    running,
    service_env,
    serving,
    start_redis,
    stop_group,
    trainjob_run,
    wait_for_status,
    wait_for_worker,
)
from worker.celery_app import make_celery

SPEC = RESUMABLE_SPEC
SLOW = "slow=0.02"  # 60 steps of 2 micro-batches: about 3 s of training
FINISHED = {"succeeded", "failed", "cancelled"}


@dataclass
class Cluster:
    client: httpx.Client
    env: dict[str, str]
    logs: Path
    settings: Settings

    def worker(
        self, name: str, faults: str | None = SLOW, devices: str | None = None
    ) -> AbstractContextManager[Any]:
        env = self.env | ({"TRAINJOB_TEST_FAULTS": faults} if faults else {})
        env |= {"TRAINJOB_WORKER_DEVICES": devices} if devices else {}
        return running(["worker"], env, self.logs / f"{name}.log")

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
        return job

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.client.get(f"/v1/jobs/{job_id}/attempts").json()["data"]
        return data

    def status_events(self, job_id: str) -> list[str]:
        events = self.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()
        return [event["data"]["status"] for event in events["data"] if event["type"] == "status"]

    def weights(self, job_id: str) -> bytes:
        response = self.client.get(f"/v1/jobs/{job_id}/weights")
        assert response.status_code == 200
        return response.content


def wait_for_checkpoint(cluster: Cluster, job_id: str, at_least: int) -> dict[str, Any]:
    def checkpointed() -> dict[str, Any] | None:
        job = cluster.job(job_id)
        assert job["status"] not in FINISHED, job
        steps = [
            c["step"] for c in cluster.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        ]
        return job if job["status"] == "running" and steps and max(steps) >= at_least else None

    found: dict[str, Any] = wait_for(checkpointed, 60, f"a checkpoint ≥ {at_least}", 0.05)
    return found


@contextmanager
def api_client(env: dict[str, str], logs: Path) -> Iterator[httpx.Client]:
    with (
        serving(env, logs / "api.log") as api,
        httpx.Client(base_url=api.url, timeout=10) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> Iterator[Cluster]:
    database_url = make_postgres_database()
    upgrade(database_url)
    logs = tmp_path_factory.mktemp("faults")
    values = {
        "database_url": database_url,
        "redis_url": "redis://127.0.0.1:6379/0",
        "queue": f"{queue_name}-faults",
        "home": str(logs / "home"),
    } | FAST_TIMINGS
    env = service_env(**values)
    with api_client(env, logs) as client:
        yield Cluster(client, env, logs, Settings(**values))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The weights of an undisturbed run of SPEC."""
    return trainjob_run(SPEC, tmp_path_factory.mktemp("reference"), timeout=120)


def test_a_killed_worker_s_job_resumes_on_a_new_worker_to_the_same_weights(
    cluster: Cluster, reference_weights: bytes
) -> None:
    with cluster.worker("kill-a") as first:
        job_id = cluster.client.post("/v1/jobs", json=SPEC).json()["id"]
        wait_for_checkpoint(cluster, job_id, at_least=10)
        os.killpg(first.pid, signal.SIGKILL)  # the whole worker: parent and training child
        first.wait(10)
    with cluster.worker("kill-b"):
        done = wait_for_status(cluster.client, job_id, FINISHED, timeout=90)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    first_run, second_run = cluster.attempts(job_id)
    assert first_run["reason"] == "worker_lost" and first_run["counted"]
    assert second_run["reason"] == "succeeded" and second_run["worker"] != first_run["worker"]
    assert second_run["resumed_from_step"] >= 10
    assert cluster.weights(job_id) == reference_weights


def test_the_same_job_delivered_twice_at_once_trains_once(cluster: Cluster) -> None:
    with cluster.worker("twice-a") as first, cluster.worker("twice-b") as second:
        wait_for_worker(first, cluster.logs / "twice-a.log")
        wait_for_worker(second, cluster.logs / "twice-b.log")
        job_id = cluster.client.post("/v1/jobs", json=SPEC).json()["id"]
        enqueue_training(make_celery(cluster.settings), job_id=job_id, queue=cluster.settings.queue)
        done = wait_for_status(cluster.client, job_id, FINISHED, timeout=90)

        def refused() -> bool:
            logs = [(cluster.logs / f"twice-{n}.log").read_text() for n in "ab"]
            return any(f"message for job {job_id}: nothing claimable" in log for log in logs)

        wait_for(refused, 10, "the second delivery to be refused")
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert len(cluster.attempts(job_id)) == 1
    assert cluster.status_events(job_id) == ["queued", "running", "succeeded"]


def test_sigterm_hands_the_job_back_with_a_checkpoint_and_no_attempt_counted(
    cluster: Cluster, reference_weights: bytes
) -> None:
    # The first worker trains at a slow pace (about 24 s for the job), so that it is still
    # training when the second is ready, however long that takes on a loaded machine.
    with cluster.worker("term-a", faults="slow=0.2") as first:
        job_id = cluster.client.post("/v1/jobs", json=SPEC).json()["id"]
        wait_for_checkpoint(cluster, job_id, at_least=5)
        with cluster.worker("term-b") as second:
            wait_for_worker(second, cluster.logs / "term-b.log")
            stopped_at = time.monotonic()
            first.send_signal(signal.SIGTERM)  # the worker's main process, as Docker does
            first.wait(30)
            shutdown_seconds = time.monotonic() - stopped_at
            done = wait_for_status(cluster.client, job_id, FINISHED, timeout=90)
    assert first.returncode == 0 and shutdown_seconds < 10
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1
    handed_back, finished = cluster.attempts(job_id)
    assert handed_back["reason"] == "shutdown" and not handed_back["counted"]
    assert finished["reason"] == "succeeded" and finished["resumed_from_step"] > 0
    assert "queued" in cluster.status_events(job_id)[2:]
    assert cluster.weights(job_id) == reference_weights


@pytest.mark.slow
def test_sigterm_hands_a_job_on_two_devices_back_and_another_worker_resumes_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    # fp64: the run on two devices ends within 1e-10 of one device's, resumed or not.
    spec = SPEC | {"precision": "fp64", "micro_batch_size": 4, "devices": 2}
    with cluster.worker("group-a", faults="slow=0.2", devices="cpu:2") as first:
        job_id = cluster.client.post("/v1/jobs", json=spec).json()["id"]
        wait_for_checkpoint(cluster, job_id, at_least=5)
        with cluster.worker("group-b", devices="cpu:2") as second:
            wait_for_worker(second, cluster.logs / "group-b.log")
            first.send_signal(signal.SIGTERM)  # the worker's main process, as Docker does
            first.wait(30)
            done = wait_for_status(cluster.client, job_id, FINISHED, timeout=120)
    assert first.returncode == 0
    assert done["status"] == "succeeded", done["error"]
    handed_back, finished = cluster.attempts(job_id)
    assert handed_back["reason"] == "shutdown" and not handed_back["counted"]
    assert finished["reason"] == "succeeded" and finished["resumed_from_step"] > 0
    one_device = SPEC | {"precision": "fp64", "micro_batch_size": 8}
    expected = load_safetensors(trainjob_run(one_device, tmp_path, timeout=120))
    actual = load_safetensors(cluster.weights(job_id))
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize(("fault", "error_type"), [("nan", "nan_loss"), ("oom", "out_of_memory")])
def test_deterministic_failures_fail_at_once_without_retry(
    cluster: Cluster, fault: str, error_type: str
) -> None:
    with cluster.worker(f"fail-{fault}", faults=fault):
        job_id = cluster.client.post("/v1/jobs", json=SPEC).json()["id"]
        done = wait_for_status(cluster.client, job_id, FINISHED, timeout=60)
    assert done["status"] == "failed" and done["error"]["type"] == error_type
    assert done["attempts"] == 1
    assert [attempt["reason"] for attempt in cluster.attempts(job_id)] == [error_type]
    assert cluster.status_events(job_id) == ["queued", "running", "failed"]


def test_max_runtime_checkpoints_and_fails_with_timeout(cluster: Cluster) -> None:
    with cluster.worker("runtime"):
        spec = SPEC | {"max_steps": 1000, "max_runtime_seconds": 2}
        job_id = cluster.client.post("/v1/jobs", json=spec).json()["id"]
        done = wait_for_status(cluster.client, job_id, FINISHED, timeout=60)
    assert done["status"] == "failed" and done["error"]["type"] == "timeout"
    # Training time counts from the claim (data loading included) over all attempts.
    assert done["progress"]["step"] < 1000 and done["runtime_seconds"] >= 2
    checkpoints = cluster.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints[-1]["step"] == done["progress"]["step"]


def test_a_redis_restart_mid_job_still_succeeds_exactly_once(
    tmp_path: Path,
    make_postgres_database: Callable[[], str],
    queue_name: str,
    reference_weights: bytes,
) -> None:
    database_url = make_postgres_database()
    upgrade(database_url)
    port = free_port()
    redis_server = start_redis(port, tmp_path / "redis.log")
    env = service_env(
        database_url=database_url,
        redis_url=f"redis://127.0.0.1:{port}/0",
        queue=f"{queue_name}-restart",
        home=str(tmp_path / "home"),
        **FAST_TIMINGS,
    )
    try:
        with api_client(env, tmp_path) as client:
            with running(["worker"], env | {"TRAINJOB_TEST_FAULTS": SLOW}, tmp_path / "w.log"):
                cluster = Cluster(client, env, tmp_path, Settings())
                job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
                wait_for_checkpoint(cluster, job_id, at_least=10)
                os.killpg(redis_server.pid, signal.SIGKILL)  # everything in Redis is lost
                redis_server.wait(10)
                redis_server = start_redis(port, tmp_path / "redis-restarted.log")
                done = wait_for_status(client, job_id, FINISHED, timeout=120)
            attempts = cluster.attempts(job_id)
            assert done["status"] == "succeeded", done["error"]
            assert cluster.status_events(job_id).count("succeeded") == 1
            assert cluster.weights(job_id) == reference_weights
            # Never two runs at once: each attempt ended before the next one started.
            for earlier, later in itertools.pairwise(attempts):
                assert earlier["ended_at"] is not None
                assert earlier["ended_at"] <= later["started_at"]
    finally:
        stop_group(redis_server)
