"""One job on several devices, through the API, on a real worker that owns three CPU
"devices" (TRAINJOB_WORKER_DEVICES=cpu:3): the ranks are processes started by
torch.distributed.run (worker/group.py).

- A job on N devices ends at the weights of the same job trained as one batch of
  m·k·N on one device (fp64, to 1e-10), through a tail window that leaves a rank with
  no samples, and an out-of-memory error on one rank that every rank backs off from.
- A rank SIGKILLed mid-run: the job is retried from its checkpoint and ends at the same
  weights, well within the lease timeout, and no process of the group is left.
- A job on more devices than any live worker owns stays queued, with a warning event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.conftest import StartService, wait_for
from tests.processes import wait_for_status

LEASE_TIMEOUT = 30.0
# On rank 1 of a group, every micro-batch of more than 4 samples runs out of memory.
FAULTS = "oom=4,oom_rank=1,slow=0.02"
MLP: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    # 16 samples, 2 held out: windows of 12 leave a tail of 2 (one rank of three gets none).
    "dataset": {"type": "synthetic-classification", "n_samples": 16, "n_features": 6},
    "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "grad_clip_norm": 0.5,
    "precision": "fp64",
    "device": "cpu",
    "max_steps": 6,
}
GPT: dict[str, Any] = {
    "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
    "dataset": {"type": "tiny-text", "min_length": 2, "max_length": 33},
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "precision": "fp64",
    "device": "cpu",
    "max_steps": 6,
}


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service(
        "devices",
        worker_env={"TRAINJOB_TEST_FAULTS": FAULTS},
        worker_devices="cpu:3",
        lease_timeout_seconds=str(LEASE_TIMEOUT),
        heartbeat_seconds="1",
        progress_flush_seconds="0.2",
    ) as client:
        yield client


def trained(service: httpx.Client, spec: dict[str, Any], timeout: float = 240) -> str:
    """The id of the job of `spec`, once it succeeded."""
    job = service.post("/v1/jobs", json=spec)
    assert job.status_code == 201, job.text
    done = wait_for_status(service, job.json()["id"], {"succeeded", "failed"}, timeout=timeout)
    assert done["status"] == "succeeded", done["error"]
    return str(done["id"])


def losses_of(service: httpx.Client, job_id: str) -> torch.Tensor:
    metrics = service.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    return torch.tensor([m["loss"] for m in metrics], dtype=torch.float64)


def weights_of(service: httpx.Client, job_id: str) -> torch.Tensor:
    tensors = load_safetensors(service.get(f"/v1/jobs/{job_id}/weights").content)
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= 1e-10, f"relative error {error:.3e}"


def group_processes() -> list[psutil.Process]:
    """This machine's launchers and ranks of jobs on several devices."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "torch.distributed.run" in command or "worker.rank" in command:
            found.append(process)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "devices", "micro", "steps", "micro_in_use"),
    [
        (MLP, 3, 2, 2, 2),  # windows of 12 of 14 samples: a tail of 2, one rank gets none
        (GPT, 2, 8, 1, 4),  # rank 1 runs out of memory at 8: both ranks back off to 4
    ],
    ids=["mlp-3-tail", "gpt-2-oom"],
)
def test_a_job_on_n_devices_ends_at_the_weights_of_one_batch(
    service: httpx.Client,
    spec: dict[str, Any],
    devices: int,
    micro: int,
    steps: int,
    micro_in_use: int,
) -> None:
    on_devices = {**spec, "micro_batch_size": micro, "accumulation_steps": steps}
    job = service.post("/v1/jobs", json={**on_devices, "devices": devices}).json()
    batch = micro * steps * devices
    assert (job["devices"], job["batch_size"]) == (devices, batch)
    done = wait_for_status(service, job["id"], {"succeeded", "failed"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    # One micro-batch of the whole window on one device.
    one_batch = trained(service, {**spec, "micro_batch_size": batch, "accumulation_steps": 1})
    assert_close(weights_of(service, job["id"]), weights_of(service, one_batch))
    assert_close(losses_of(service, job["id"]), losses_of(service, one_batch))
    metrics = service.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    assert [m["micro_batch_size"] for m in metrics] == [micro_in_use] * 6


@pytest.mark.slow
def test_a_group_with_a_rank_killed_resumes_to_the_same_weights(service: httpx.Client) -> None:
    spec = {**MLP, "micro_batch_size": 1, "accumulation_steps": 2, "devices": 2,
            "max_steps": 14, "checkpoint_every": 2}  # fmt: skip
    job = service.post("/v1/jobs", json=spec).json()

    def checkpointed() -> bool:
        return bool(service.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"])

    wait_for(checkpointed, 120, "a checkpoint of the group")
    ranks = [
        process
        for process in group_processes()
        if "worker.rank" in " ".join(process.cmdline()) and process.environ().get("RANK") == "1"
    ]
    assert len(ranks) == 1, ranks
    ranks[0].kill()
    killed_at = time.monotonic()

    def running_again() -> bool:
        current = service.get(f"/v1/jobs/{job['id']}").json()
        return current["attempts"] == 2 and current["status"] in ("running", "succeeded")

    wait_for(running_again, LEASE_TIMEOUT, "the job's second attempt")
    retried_after = time.monotonic() - killed_at
    done = wait_for_status(service, job["id"], {"succeeded", "failed"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert retried_after < LEASE_TIMEOUT / 2, retried_after
    attempts = service.get(f"/v1/jobs/{job['id']}/attempts").json()["data"]
    assert [a["reason"] for a in attempts] == ["rank_failed", "succeeded"], attempts
    undisturbed = {**spec, "devices": 1, "micro_batch_size": 4, "accumulation_steps": 1}
    assert_close(weights_of(service, job["id"]), weights_of(service, trained(service, undisturbed)))
    wait_for(lambda: not group_processes(), 30, "every process of the groups to end")


@pytest.mark.slow
def test_a_running_group_cancelled_by_http_stops_with_a_checkpoint(service: httpx.Client) -> None:
    long = {**MLP, "micro_batch_size": 1, "accumulation_steps": 1, "devices": 2,
            "max_steps": 1_000_000}  # fmt: skip
    job = service.post("/v1/jobs", json=long).json()

    def training() -> bool:
        current = service.get(f"/v1/jobs/{job['id']}").json()
        return current["status"] == "running" and current["progress"]["step"] > 0

    wait_for(training, 120, "the group to train", interval=0.1)
    assert service.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
    done = wait_for_status(service, job["id"], {"cancelled", "succeeded", "failed"}, timeout=30)
    assert done["status"] == "cancelled"
    checkpoints = service.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == done["progress"]["step"]
    wait_for(lambda: not group_processes(), 30, "the group's processes to end")


def test_a_job_on_more_devices_than_any_worker_has_waits_with_a_warning(
    service: httpx.Client,
) -> None:
    spec = {**MLP, "micro_batch_size": 1, "accumulation_steps": 1, "devices": 4}
    # The worker announces its queues once it is up: until then nothing is compared.
    wait_for(lambda: service.get("/v1/dashboard").json()["workers"], 60, "the worker")
    job = service.post("/v1/jobs", json=spec).json()
    events = service.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    warnings = [event["data"]["message"] for event in events if event["type"] == "warning"]
    assert warnings == [
        "the job needs 4 devices and no live worker has that many (the most is 3): it stays "
        "queued until one starts (trainjob worker --devices)"
    ]
    assert service.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert service.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
