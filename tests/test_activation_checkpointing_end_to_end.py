"""Activation checkpointing through the API, on a real worker: it changes no bit.

- A tiny-gpt job with dropout 0.1 and activation checkpointing, its training process
  SIGKILLed mid-run, is retried from its checkpoint and ends at the fp32 weights, byte
  for byte, of the same job trained undisturbed WITHOUT checkpointing: the recomputation
  replays the forward's operations and its RNG, and so does the resume.
- A tiny Llama with attention dropout 0.1: checkpointing on and off end at the same fp32
  weights, byte for byte.
- A model that cannot recompute its activations (mlp) is refused with 422.

Every job costs seconds of a fresh worker child's start, so there are four: submitted at
once (the killed one first, so that it is the one running), each test waiting for its
own. The rest is pinned cheaper in tests/worker/engine/ (test_models.py, test_hf.py,
test_trainer.py): on and off apart from any kill, without dropout, that the dropout is
real, that blocks are recomputed at all.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import StartService, wait_for
from tests.processes import FAST_TIMINGS, wait_for_status

FINISHED = {"succeeded", "failed", "cancelled"}
# Long enough at the worker's pace (slow=0.02 a micro-batch: 30 steps of 2 take over
# 1.2 s) to be killed after its step-5 checkpoint and well before its end.
TINY_GPT: dict[str, Any] = {
    "model": {
        "type": "tiny-gpt",
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        "block_size": 32,
        "dropout": 0.1,
    },
    "dataset": {"type": "tiny-text", "min_length": 2, "max_length": 33},
    "micro_batch_size": 2,
    "accumulation_steps": 2,
    "max_steps": 30,
    "checkpoint_every": 5,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "precision": "fp32",
    "device": "cpu",
}
LLAMA = TINY_GPT | {
    "model": {
        "type": "hf-causal-lm",
        "config": {
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 96,
            "max_position_embeddings": 64,
            "attention_dropout": 0.1,
        },
    },
    "max_steps": 6,
}
ON = {"activation_checkpointing": True}
JOBS = {
    "killed": TINY_GPT | ON,
    "gpt-off": TINY_GPT,
    "llama-on": LLAMA | ON,
    "llama-off": LLAMA,
}


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service(
        "activation-checkpointing",
        worker_env={"TRAINJOB_TEST_FAULTS": "slow=0.02"},
        **FAST_TIMINGS,  # a killed run's lease expires in 2 s
    ) as client:
        yield client


@pytest.fixture(scope="module")
def jobs(service: httpx.Client) -> dict[str, str]:
    """Job ids by name, submitted in JOBS's order."""
    ids = {}
    for name, spec in JOBS.items():
        response = service.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    return ids


def weights(service: httpx.Client, job_id: str) -> bytes:
    done = wait_for_status(service, job_id, FINISHED, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    response = service.get(f"/v1/jobs/{job_id}/weights")
    assert response.status_code == 200
    return response.content


def kill_training_process(service: httpx.Client, job_id: str) -> None:
    """SIGKILL the process training the job once it has checkpointed step 5, as the OOM
    killer would: the worker's pool child (the worker is named trainjob-PID@HOST)."""

    def checkpointed() -> dict[str, Any] | None:
        job: dict[str, Any] = service.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] not in FINISHED, job
        found = service.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        return job if job["status"] == "running" and found else None

    job = wait_for(checkpointed, 60, "a checkpoint of the running job")
    match = re.fullmatch(r"trainjob-(\d+)@.*", job["worker"])
    assert match, job["worker"]
    (pool_child,) = psutil.Process(int(match[1])).children()
    pool_child.send_signal(signal.SIGKILL)


def test_a_killed_checkpointed_job_resumes_to_the_weights_of_an_undisturbed_plain_one(
    service: httpx.Client, jobs: dict[str, str]
) -> None:
    kill_training_process(service, jobs["killed"])
    resumed = weights(service, jobs["killed"])
    first, second = service.get(f"/v1/jobs/{jobs['killed']}/attempts").json()["data"]
    assert first["reason"] == "worker_lost"
    assert second["reason"] == "succeeded" and second["resumed_from_step"] >= 5
    assert resumed == weights(service, jobs["gpt-off"])


def test_a_llama_trained_with_and_without_checkpointing_ends_at_the_same_fp32_weights(
    service: httpx.Client, jobs: dict[str, str]
) -> None:
    assert weights(service, jobs["llama-on"]) == weights(service, jobs["llama-off"])


def test_a_model_that_cannot_recompute_is_refused(service: httpx.Client) -> None:
    spec = TINY_GPT | {
        "model": {"type": "mlp"},
        "dataset": {"type": "digits"},
        "activation_checkpointing": True,
    }
    response = service.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert "activation_checkpointing: model 'mlp' cannot recompute" in response.text
