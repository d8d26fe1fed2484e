"""Issue 17's options for fitting a model on a small GPU, all at once: LoRA adapters,
activation checkpointing and sequence packing on one prompt/completion file. Each has
its own tests; these check that they compose — accumulation stays exact in fp64 for
any (m, k), and checkpointing still changes no bit, on tiny-gpt and a Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine.trainer import train

from .conftest import assert_close_relative
from .test_file_datasets import ADAMW, TRAIN_ID, Files, file_spec, prompt_completion_rows
from .test_trainer import weights_vector

TINY_GPT = {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 64}
LLAMA = {
    "type": "hf-causal-lm",
    "config": {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 260,
        "max_position_embeddings": 128,
    },
}
SPLITS = [(4, 1), (2, 2), (1, 4)]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def final_weights(files: Files, micro: int, steps: int, **options: Any) -> torch.Tensor:
    spec = file_spec(micro_batch_size=micro, accumulation_steps=steps, max_steps=3, **options)
    # A LoRA run's weights are the merged ones: base and every adapter's update.
    return weights_vector(train(spec, files=files).weights)


@pytest.mark.parametrize("model", [TINY_GPT, LLAMA], ids=["tiny-gpt", "llama"])
def test_lora_checkpointing_and_packing_together_keep_accumulation_exact(
    files: Files, model: dict[str, Any]
) -> None:
    files.jsonl(TRAIN_ID, prompt_completion_rows(30))
    options: dict[str, Any] = {
        "model": model,
        "lora": {"r": 4, "alpha": 8},
        "activation_checkpointing": True,
        "dataset": {"packing": True},
        **ADAMW,
    }
    finals = [final_weights(files, micro, steps, **options) for micro, steps in SPLITS]
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-10)
    # The adapters moved: a comparison of untrained weights would prove nothing.
    untouched = final_weights(files, 4, 1, **{**options, "optimizer": {"type": "sgd", "lr": 1e-9}})
    assert not torch.allclose(finals[0], untouched, rtol=0, atol=1e-6)
    without_checkpointing = final_weights(
        files, 2, 2, **options | {"activation_checkpointing": False}
    )
    assert torch.equal(without_checkpointing, finals[1])
