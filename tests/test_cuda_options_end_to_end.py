"""The CUDA-only options through the API on a CPU worker: the API accepts `quantize` and
optimizer `adamw8bit` (another worker may have CUDA), and the worker that claims the job
fails it at once with invalid_spec saying it needs CUDA, without retrying it and before
loading anything (the pretrained model named here does not even exist)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import StartService
from tests.processes import wait_for_status

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA worker would train these jobs: tests/cuda does"
)

TINY_TEXT = {"type": "tiny-text", "min_length": 2, "max_length": 33}
QUANTIZED: dict[str, Any] = {
    "model": {"type": "hf-causal-lm", "pretrained": "/models/no-such-llama"},
    "dataset": TINY_TEXT,
    "quantize": "nf4",
    "lora": {"r": 8, "alpha": 16},
    "micro_batch_size": 2,
    "accumulation_steps": 2,
    "max_steps": 2,
}
EIGHT_BIT_ADAMW: dict[str, Any] = {
    "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
    "dataset": TINY_TEXT,
    "optimizer": {"type": "adamw8bit", "lr": 0.01},
    "micro_batch_size": 2,
    "accumulation_steps": 2,
    "max_steps": 2,
}


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service("cuda-options") as client:
        yield client


def test_a_cpu_worker_fails_quantize_and_adamw8bit_jobs_saying_they_need_cuda(
    service: httpx.Client,
) -> None:
    submitted = {}
    for spec, named in (
        (QUANTIZED, "quantize 'nf4'"),
        (EIGHT_BIT_ADAMW, "optimizer.type 'adamw8bit'"),
    ):
        response = service.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        submitted[named] = response.json()["id"]
    for named, job_id in submitted.items():
        job = wait_for_status(service, job_id, {"succeeded", "failed"}, timeout=60)
        assert job["status"] == "failed" and job["attempts"] == 1, job
        assert job["error"] == {
            "type": "invalid_spec",
            "message": f"{named} needs a CUDA device; this worker trains on cpu",
        }
        assert job["progress"]["step"] == 0
