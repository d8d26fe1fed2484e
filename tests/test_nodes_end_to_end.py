"""One job across several worker nodes, through the API: nodes simulated by separate
`trainjob worker` processes on this machine, each declaring `cpu:1`, each with its own
TRAINJOB_WORKER_ADDRESS (127.0.0.1, .2, .3: the rendezvous and the ranks' addresses),
sharing an API and a database of their own.

- 2 and 3 nodes × 1 process (fp64, gloo) end at the weights of one process training the
  whole window as one micro-batch, to 1e-10;
- two 2-node jobs submitted at once to 3 workers: one runs, the other waits holding no
  slot (no deadlock), and both finish;
- a node's worker SIGKILLed mid-run: the others leave the group within the stated bound,
  and the job resumes from its checkpoint on as many nodes (or, elastic, on fewer, with
  the same global batch) and ends at the undisturbed weights;
- a running gang cancelled stops on every node; one paused stops on every node and
  resumes on two; a follower's worker
  stopped gracefully: the whole group checkpoints and hands back.

The workers are shared: each test leaves the next as many as it needs (3, 3, 2, 2, 2, 1).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy import select

from app.db import Database, upgrade
from app.jobs.models import JobSlot
from tests.conftest import REDIS_URL
from tests.processes import (
    TRAINJOB,
    kill_group,
    service_env,
    serving,
    start,
    stop_group,
    wait_for,
    wait_for_status,
    wait_for_worker,
)

HEARTBEAT = 0.5
LEASE_TIMEOUT = 5.0
# How soon the other nodes leave a group whose node died: at once when the dead node's
# connections close (gloo), else when its slot or the job's lease expires.
LEAVE_BOUND = LEASE_TIMEOUT + 2 * HEARTBEAT + 2
FINISHED = {"succeeded", "failed", "cancelled"}
MLP: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "synthetic-classification", "n_samples": 32, "n_features": 6},
    "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "grad_clip_norm": 0.5,
    "precision": "fp64",
    "device": "cpu",
    "max_steps": 6,
}


@dataclass
class Cluster:
    client: httpx.Client
    env: dict[str, str]
    logs: Path
    database: Database
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: int = 0

    def add_workers(self, *addresses: str) -> list[str]:
        """`cpu:1` workers reached at `addresses`, started together; their names
        (jobs.worker, job_slots.worker)."""
        started = []
        for address in addresses:
            self.started += 1
            log = self.logs / f"worker-{self.started}.log"
            env = self.env | {
                "TRAINJOB_WORKER_ADDRESS": address,
                "TRAINJOB_WORKER_DEVICES": "cpu:1",
            }
            process = start([*TRAINJOB, "worker"], env, log)
            # Named as the worker names itself: its main process's pid, this host.
            self.workers[f"trainjob-{process.pid}@{socket.gethostname()}"] = process
            started.append((process, log))
        for process, log in started:
            wait_for_worker(process, log)
        return list(self.workers)[-len(addresses) :]

    def slots(self) -> list[tuple[str, int, str | None]]:
        with self.database.session() as session:
            rows = session.execute(
                select(JobSlot.job_id, JobSlot.slot, JobSlot.worker).order_by(
                    JobSlot.job_id, JobSlot.slot
                )
            )
            return [(row.job_id, row.slot, row.worker) for row in rows]

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def finished(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        done: dict[str, Any] = wait_for_status(self.client, job_id, FINISHED, timeout)
        assert done["status"] == "succeeded", done["error"]
        return done

    def weights(self, job_id: str) -> torch.Tensor:
        tensors = load_safetensors(self.client.get(f"/v1/jobs/{job_id}/weights").content)
        return torch.cat([tensors[name].flatten() for name in sorted(tensors)])

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.client.get(f"/v1/jobs/{job_id}/attempts").json()["data"]
        return data


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> Iterator[Cluster]:
    database_url = make_postgres_database()
    upgrade(database_url)
    logs = tmp_path_factory.mktemp("nodes")
    env = service_env(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-nodes",
        home=str(logs / "home"),
        heartbeat_seconds=str(HEARTBEAT),
        lease_timeout_seconds=str(LEASE_TIMEOUT),
        reaper_interval_seconds="0.5",
        requeue_after_seconds="3",
        progress_flush_seconds="0.2",
        gang_wait_seconds="30",
        # A pause per micro-batch (weights unchanged): a run lasts long enough to be hit.
        test_faults="slow=0.03",
    )
    database = Database(database_url)
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(serving(env, logs / "api.log"))
        client = stack.enter_context(httpx.Client(base_url=api.url, timeout=30))
        cluster = Cluster(client, env, logs, database)
        stack.callback(database.dispose)
        stack.callback(lambda: [stop_group(process) for process in cluster.workers.values()])
        cluster.add_workers("127.0.0.1", "127.0.0.2", "127.0.0.3")
        queue = env["TRAINJOB_QUEUE"]

        def ours() -> int:  # Redis is shared: other tests' workers are there too
            workers = client.get("/v1/dashboard").json()["workers"]
            return sum(queue in worker["queues"] for worker in workers)

        # Until then, a worker could count fewer free nodes than there are.
        wait_for(lambda: ours() == 3, 30, "3 workers to announce themselves")
        yield cluster


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= 1e-10, f"relative error {error:.3e}"


_ONE_BATCH: dict[int, torch.Tensor] = {}


def one_batch_of_12(cluster: Cluster, steps: int) -> torch.Tensor:
    """The weights of MLP trained `steps` steps by one process, each window of 12 one
    micro-batch: what every job here ends at, on any number of nodes (trained once)."""
    if steps not in _ONE_BATCH:
        job_id = cluster.submit({**MLP, "micro_batch_size": 12, "accumulation_steps": 1,
                                 "max_steps": steps})  # fmt: skip
        cluster.finished(job_id)
        _ONE_BATCH[steps] = cluster.weights(job_id)
    return _ONE_BATCH[steps]


def kill_a_follower(cluster: Cluster, job_id: str) -> str:
    """SIGKILL the whole worker (parent, pool child, launcher, rank) of a node that is
    not the job's leader, once the job has a checkpoint; its name."""

    def checkpointed() -> bool:
        job = cluster.client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] not in FINISHED, job
        found = cluster.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        return job["status"] == "running" and bool(found)

    wait_for(checkpointed, 90, "a checkpoint of the group")
    follower = next(worker for job, slot, worker in cluster.slots() if job == job_id and slot)
    assert follower is not None
    kill_group(cluster.workers.pop(follower))
    return follower


def wait_for_the_group_to_end(cluster: Cluster, job_id: str) -> float:
    """Seconds until the run's other nodes have left the group and the attempt ended."""
    began = time.monotonic()

    def ended() -> bool:
        attempts = cluster.attempts(job_id)
        return bool(attempts) and attempts[0]["ended_at"] is not None

    wait_for(ended, 30, "the first attempt to end")
    return time.monotonic() - began


def nodes_of_the_run(cluster: Cluster, job_id: str, attempt: int) -> int:
    """How many nodes the job's run number `attempt` holds, once it runs."""

    def running() -> int:
        job = cluster.client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] not in FINISHED, job
        if job["attempts"] < attempt or job["status"] != "running":
            return 0
        # Its gang is opened in the same transaction as the claim.
        return sum(job == job_id for job, _, _ in cluster.slots())

    found: int = wait_for(running, 60, f"run {attempt} of {job_id}")
    return found


@pytest.mark.slow
def test_two_2_node_jobs_at_once_run_one_after_the_other_to_exact_weights(
    cluster: Cluster,
) -> None:
    spec = {**MLP, "nodes": 2, "micro_batch_size": 2, "accumulation_steps": 3}
    first, second = cluster.submit(spec), cluster.submit(spec)
    job = cluster.client.get(f"/v1/jobs/{first}").json()
    assert (job["devices"], job["nodes"], job["batch_size"]) == (1, 2, 12)

    def one_runs_the_other_waits() -> bool:
        statuses = {
            cluster.client.get(f"/v1/jobs/{job}").json()["status"] for job in (first, second)
        }
        held = {job_id for job_id, _, _ in cluster.slots()}
        return statuses == {"running", "queued"} and len(held) == 1

    wait_for(one_runs_the_other_waits, 60, "one gang to run while the other waits")
    # The waiting one holds no slot; the running one holds one per node.
    running = [
        job
        for job in (first, second)
        if cluster.client.get(f"/v1/jobs/{job}").json()["status"] == "running"
    ]
    slots = cluster.slots()
    assert {job_id for job_id, _, _ in slots} <= set(running)
    for job_id in (first, second):
        cluster.finished(job_id)
    for job_id in (first, second):
        assert_close(cluster.weights(job_id), one_batch_of_12(cluster, 6))
    wait_for(lambda: not cluster.slots(), 10, "the slots to be given back")


@pytest.mark.slow
def test_a_3_node_job_ends_at_the_weights_of_one_batch(cluster: Cluster) -> None:
    spec = {**MLP, "nodes": 3, "micro_batch_size": 2, "accumulation_steps": 2}
    job_id = cluster.submit(spec)
    cluster.finished(job_id)
    assert_close(cluster.weights(job_id), one_batch_of_12(cluster, 6))
    assert [a["reason"] for a in cluster.attempts(job_id)] == ["succeeded"]


def group_processes(cluster: Cluster) -> list[psutil.Process]:
    """The launchers and ranks this module's workers started."""
    found = []
    for worker in cluster.workers.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in psutil.Process(worker.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    command = " ".join(process.cmdline())
                    if "torch.distributed.run" in command or "worker.rank" in command:
                        found.append(process)
    return found


@pytest.mark.slow
def test_an_elastic_job_that_loses_a_node_resumes_on_fewer_with_the_same_batch(
    cluster: Cluster,
) -> None:
    spec = {**MLP, "nodes": 3, "elastic": {"min_nodes": 2}, "micro_batch_size": 2,
            "accumulation_steps": 2, "max_steps": 30, "checkpoint_every": 2}  # fmt: skip
    job_id = cluster.submit(spec)
    kill_a_follower(cluster, job_id)
    assert wait_for_the_group_to_end(cluster, job_id) < LEAVE_BOUND
    # Two workers left: the job resumes on two nodes, each rank accumulating 3 of its
    # micro-batches of 2 where it had 2, the window still 12.
    assert nodes_of_the_run(cluster, job_id, attempt=2) == 2
    done = cluster.finished(job_id)
    assert done["batch_size"] == 12
    attempts = cluster.attempts(job_id)
    assert [a["reason"] for a in attempts] == ["rank_failed", "succeeded"]
    assert attempts[1]["resumed_from_step"] >= 2
    assert_close(cluster.weights(job_id), one_batch_of_12(cluster, 30))


@pytest.mark.slow
def test_a_job_that_loses_a_node_resumes_on_as_many_when_a_fresh_worker_appears(
    cluster: Cluster,
) -> None:
    spec = {**MLP, "nodes": 2, "micro_batch_size": 2, "accumulation_steps": 3,
            "max_steps": 30, "checkpoint_every": 2}  # fmt: skip
    job_id = cluster.submit(spec)
    kill_a_follower(cluster, job_id)
    assert wait_for_the_group_to_end(cluster, job_id) < LEAVE_BOUND
    # One worker left: the job waits for a second, holding nothing.
    wait_for(lambda: not cluster.slots(), 10, "the run's slots to go")
    assert cluster.client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    cluster.add_workers("127.0.0.4")
    assert nodes_of_the_run(cluster, job_id, attempt=2) == 2
    cluster.finished(job_id)
    attempts = cluster.attempts(job_id)
    assert [a["reason"] for a in attempts] == ["rank_failed", "succeeded"]
    assert_close(cluster.weights(job_id), one_batch_of_12(cluster, 30))


def a_training_gang(cluster: Cluster) -> str:
    """A 2-node job far longer than any test, once it trains on both nodes: its id."""
    long = {**MLP, "nodes": 2, "micro_batch_size": 2, "accumulation_steps": 1,
            "max_steps": 100_000}  # fmt: skip
    job_id = cluster.submit(long)
    wait_for(lambda: trains(cluster, job_id), 90, "the gang to train", interval=0.1)
    return job_id


def trains(cluster: Cluster, job_id: str) -> bool:
    """Whether the job runs and has made a step (it must not have finished)."""
    job = cluster.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] not in FINISHED, job
    return job["status"] == "running" and job["progress"]["step"] > 0


@pytest.mark.slow
def test_a_running_gang_cancelled_stops_on_every_node(cluster: Cluster) -> None:
    job_id = a_training_gang(cluster)
    assert sum(job == job_id for job, _, _ in cluster.slots()) == 2
    assert cluster.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    job = wait_for_status(cluster.client, job_id, FINISHED, timeout=30)
    assert job["status"] == "cancelled"
    # Both nodes stop (the leader's and the follower's launchers and ranks), the slots go,
    # and both workers stay up for the next job.
    wait_for(lambda: not cluster.slots(), 10, "the cancelled gang's slots to go")
    wait_for(lambda: not group_processes(cluster), 30, "every node's ranks to end")
    assert all(worker.poll() is None for worker in cluster.workers.values())
    checkpoints = cluster.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == job["progress"]["step"] > 0


@pytest.mark.slow
def test_a_follower_s_worker_stopping_hands_the_whole_gang_back_with_a_checkpoint(
    cluster: Cluster,
) -> None:
    job_id = a_training_gang(cluster)
    # A pause stops every node at the same window edge, after a checkpoint, and frees
    # them all; a resume runs the job on two nodes again.
    assert cluster.client.post(f"/v1/jobs/{job_id}/pause").status_code == 200
    job = wait_for_status(cluster.client, job_id, {"paused", *FINISHED}, timeout=30)
    assert job["status"] == "paused"
    wait_for(lambda: not cluster.slots(), 10, "the paused gang's slots to go")
    wait_for(lambda: not group_processes(cluster), 30, "every paused node's ranks to end")
    paused_at = job["progress"]["step"]
    assert cluster.client.post(f"/v1/jobs/{job_id}/resume").status_code == 200

    def past_the_pause() -> bool:
        step = cluster.client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"]
        return trains(cluster, job_id) and step > paused_at

    wait_for(past_the_pause, 90, "the resumed gang to train", interval=0.1)
    assert sum(job == job_id for job, _, _ in cluster.slots()) == 2
    follower = next(worker for job, slot, worker in cluster.slots() if job == job_id and slot)
    assert follower is not None
    stopping = cluster.workers.pop(follower)
    stopping.send_signal(signal.SIGTERM)  # as Docker stops a worker: a graceful shutdown
    # Every node stops at the same window edge, after a checkpoint; the job goes back to
    # the queue, the attempt not counted, and the stopped worker exits once its node's
    # launcher has.
    assert stopping.wait(30) == 0
    job = wait_for_status(cluster.client, job_id, {"queued", *FINISHED}, timeout=30)
    assert job["status"] == "queued"
    attempts = cluster.attempts(job_id)
    assert [(a["reason"], a["counted"]) for a in attempts] == [
        ("paused", False),
        ("shutdown", False),
    ]
    checkpoints = cluster.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == job["progress"]["step"] > 0
    wait_for(lambda: not cluster.slots(), 10, "the gang's slots to go")
    wait_for(lambda: not group_processes(cluster), 30, "every node's launcher and rank to end")
    # One worker left: the job waits for a second one, holding nothing.
    assert cluster.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
