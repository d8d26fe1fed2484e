"""A CUDA job on real worker processes: SIGKILLed mid-run, it resumes on a new worker to
the bits of an undisturbed run (deterministic algorithms on, dropout drawing from the
CUDA generator); and the Celery parent never initialises CUDA, only its pool child does.

The CPU-side twin of the second check, that the parent never imports torch, is
tests/worker/test_tasks.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.db import upgrade
from app.settings import Settings
from tests.conftest import wait_for
from tests.cuda.lane import CUDA_LANE
from tests.processes import FAST_TIMINGS, running, service_env, wait_for_status, wait_for_worker
from tests.test_fault_tolerance import FINISHED, Cluster, api_client, wait_for_checkpoint
from tests.worker.test_tasks import children_of, has_torch_loaded

pytestmark = CUDA_LANE

SPEC: dict[str, Any] = {
    "model": {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.1},
    "dataset": {"type": "tiny-text", "min_length": 8, "max_length": 64},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 60,
    "checkpoint_every": 5,
    "optimizer": {"type": "adamw", "lr": 0.003},
    "lr_schedule": {"type": "cosine", "warmup_steps": 5},
    "precision": "fp32",
    "seed": 7,
    "device": "cuda",
}
# Deterministic kernels on every CUDA worker here (worker/engine/determinism.py); a
# pause per micro-batch (weights unchanged) so that a job can be caught mid-run.
WORKER = {"TRAINJOB_DETERMINISTIC": "true", "TRAINJOB_TEST_FAULTS": "slow=0.02"}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> Iterator[Cluster]:
    database_url = make_postgres_database()
    upgrade(database_url)
    logs = tmp_path_factory.mktemp("cuda-workers")
    values = {
        "database_url": database_url,
        "redis_url": "redis://127.0.0.1:6379/0",
        "queue": f"{queue_name}-cuda",
        "home": str(logs / "home"),
        # The API need not have seen the CUDA worker announce itself yet.
        "allow_unseen_cuda": "true",
    } | FAST_TIMINGS
    env = service_env(**values)
    with api_client(env, logs) as client:
        yield Cluster(client, env, logs, Settings(**values))  # type: ignore[arg-type]


def cuda_worker(cluster: Cluster, name: str) -> Any:
    return running(["worker"], cluster.env | WORKER, cluster.logs / f"{name}.log")


def test_a_cuda_job_killed_mid_run_resumes_bit_identical_to_an_undisturbed_one(
    cluster: Cluster,
) -> None:
    """Bit-identical (the weights' bytes): the same kernels on the same device in the
    same order, deterministic algorithms on, and the checkpoint's CUDA random state
    restored, or the resumed run's dropout masks would differ."""
    with cuda_worker(cluster, "cuda-kill-a") as first:
        job_id = cluster.client.post("/v1/jobs", json=SPEC).json()["id"]
        wait_for_checkpoint(cluster, job_id, at_least=10)
        os.killpg(first.pid, signal.SIGKILL)  # the whole worker: parent and training child
        first.wait(10)
    with cuda_worker(cluster, "cuda-kill-b"):
        resumed = wait_for_status(cluster.client, job_id, FINISHED, timeout=120)
        assert resumed["status"] == "succeeded", resumed["error"]
        assert resumed["attempts"] == 2, resumed
        reference_id = cluster.client.post("/v1/jobs", json=SPEC).json()["id"]
        undisturbed = wait_for_status(cluster.client, reference_id, FINISHED, timeout=120)
        assert undisturbed["status"] == "succeeded", undisturbed["error"]
    assert cluster.weights(job_id) == cluster.weights(reference_id)


def has_cuda_driver_loaded(pid: int) -> bool:
    """CUDA initialised in the process: the driver library is mapped (torch loads it at
    initialisation, not at import)."""
    return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()


def compute_processes() -> set[int] | None:
    """The pids nvidia-smi lists as holding a CUDA context; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    listed = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return {int(line) for line in listed.stdout.split() if line.strip().isdigit()}


def test_the_celery_parent_never_initialises_cuda_while_its_child_trains(
    cluster: Cluster,
) -> None:
    """Forking after CUDA initialisation breaks every later pool child: the parent must
    not hold the driver, while the child training a CUDA job does (so the check can see
    it)."""
    long = {**SPEC, "max_steps": 100_000, "checkpoint_every": 0}
    log = cluster.logs / "cuda-parent.log"
    with running(["worker"], cluster.env | WORKER, log) as worker:
        wait_for_worker(worker, log)
        job_id = cluster.client.post("/v1/jobs", json=long).json()["id"]

        def training() -> bool:
            job = cluster.job(job_id)
            assert job["status"] not in FINISHED, job
            return job["status"] == "running" and job["progress"]["step"] > 0

        wait_for(training, 120, "the CUDA job to train", interval=0.1)
        children = children_of(worker.pid)
        assert any(has_cuda_driver_loaded(child) for child in children), children
        assert not has_cuda_driver_loaded(worker.pid)
        assert not has_torch_loaded(worker.pid)
        holding = compute_processes()
        if holding is not None:
            assert worker.pid not in holding, holding
        cancelled = cluster.client.post(f"/v1/jobs/{job_id}/cancel").json()
        assert cancelled["status"] in ("cancelling", "cancelled"), cancelled
        wait_for_status(cluster.client, job_id, FINISHED, timeout=60)
