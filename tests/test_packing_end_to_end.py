"""Sequence packing through the whole service: the same loss and gradients as unpacked.

Real processes (API and one worker) on a database of their own. A variable-length
prompt/completion file is uploaded; on tiny-gpt and on a Llama config, fp64, one job
trains it unpacked and one packed, each a single SGD step (lr 1) over one window that
holds every training row. The same rows make up the step, so the reported loss, the
gradient's norm, the held-out loss and the weights after the step (w - g: equal weights
are equal gradients) must agree within 1e-10. Packing for a classifier is refused at
submit (a causal LM that cannot keep packed rows apart fails `invalid_spec` when the
worker builds it: tests/worker/engine/test_packing.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import StartService
from tests.processes import wait_for_status
from tests.test_files_end_to_end import FINISHED, jsonl, upload, validated, weights_of

TINY_GPT = {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 47}
LLAMA = {
    "type": "hf-causal-lm",
    "config": {
        "model_type": "llama",
        "vocab_size": 257,  # byte-level: the config brings no tokenizer
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
}
MODELS = {"tiny-gpt": TINY_GPT, "llama": LLAMA}


def prompt_completion_file() -> bytes:
    """Prompts and completions of 1 to 20 characters: packs of very different rows."""
    rng = random.Random(17)
    letters = "abcdefghij klmnop"

    def text() -> str:
        return "".join(rng.choices(letters, k=rng.randint(1, 20)))

    return jsonl([{"prompt": text(), "completion": text()} for _ in range(24)])


def one_step_spec(model: dict[str, Any], file_id: str, packing: bool) -> dict[str, Any]:
    return {
        "model": model,
        # 18 training rows, 6 held out (the same rows either way: held out before packing).
        "dataset": {
            "type": "file",
            "file_id": file_id,
            "max_length": 48,
            "eval_fraction": 0.25,
            "packing": packing,
        },
        # One window of up to 32 samples: every row, or every pack, in one step.
        "micro_batch_size": 4,
        "accumulation_steps": 8,
        "max_steps": 1,
        "eval_every": 1,
        "optimizer": {"type": "sgd", "lr": 1.0},
        "precision": "fp64",
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service("packing-e2e", progress_flush_seconds="0.2") as client:
        yield client


@pytest.fixture(scope="module")
def finished(service: httpx.Client) -> dict[str, dict[str, Any]]:
    """Every job of this module, submitted together and run to its end, by name."""
    file_id = upload(service, "pairs.jsonl", prompt_completion_file())["id"]
    assert validated(service, file_id)["status"] == "valid"
    specs = {
        f"{name}-{'packed' if packing else 'unpacked'}": one_step_spec(model, file_id, packing)
        for name, model in MODELS.items()
        for packing in (False, True)
    }
    submitted = {}
    for name, spec in specs.items():
        response = service.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        submitted[name] = response.json()["id"]
    return {
        name: wait_for_status(service, job_id, FINISHED, timeout=180)
        for name, job_id in submitted.items()
    }


@pytest.mark.parametrize("model", sorted(MODELS))
def test_packing_gives_the_unpacked_loss_and_gradient_in_fp64(
    service: httpx.Client, finished: dict[str, dict[str, Any]], model: str
) -> None:
    unpacked, packed = finished[f"{model}-unpacked"], finished[f"{model}-packed"]
    assert unpacked["status"] == packed["status"] == "succeeded", (unpacked, packed)
    assert unpacked["metrics"]["grad_norm"] > 0  # the step moved the weights
    # Fewer samples (packs) made the step, from the same rows and tokens.
    assert packed["metrics"]["window_samples"] < unpacked["metrics"]["window_samples"]
    assert packed["progress"]["tokens_seen"] == unpacked["progress"]["tokens_seen"]
    for figure in ("loss", "grad_norm", "eval_loss"):
        assert packed["metrics"][figure] == pytest.approx(unpacked["metrics"][figure], rel=1e-10), (
            figure
        )
    packed_weights = weights_of(service, packed["id"])
    unpacked_weights = weights_of(service, unpacked["id"])
    assert packed_weights.keys() == unpacked_weights.keys()
    for name, tensor in packed_weights.items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(tensor, unpacked_weights[name], rtol=0, atol=1e-10)


def test_packing_for_a_classifier_is_refused_at_submit(
    service: httpx.Client, finished: dict[str, dict[str, Any]]
) -> None:
    file_id = finished["llama-packed"]["spec"]["dataset"]["file_id"]
    spec = one_step_spec(
        {"type": "hf-sequence-classification", "config": {"model_type": "bert"}}, file_id, True
    )
    response = service.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert "dataset.packing: needs a model that keeps packed rows apart" in response.text
