"""Exact accumulation on CUDA: (m, k) ends at the weights of (m·k, 1) for tiny-gpt on
variable-length token batches, the built-in text and an uploaded-style text file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cuda.lane import CUDA_LANE, FP32_TOLERANCE, FP64_TOLERANCE, flat_weights, relative_error
from tests.worker.engine.conftest import make_spec
from tests.worker.engine.test_file_datasets import (
    ADAMW,
    TINY_GPT,
    TRAIN_ID,
    Files,
    variable_length_texts,
)
from tests.worker.engine.test_trainer import TEXT
from worker.engine.trainer import train

pytestmark = CUDA_LANE

SPLITS = [(8, 1), (2, 4), (1, 8)]
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp64": FP64_TOLERANCE}


def finals(files: Files | None = None, **spec: Any) -> list[Any]:
    weights = []
    for micro, steps in SPLITS:
        run = make_spec(**spec, device="cuda", micro_batch_size=micro, accumulation_steps=steps)
        weights.append(flat_weights(train(run, files=files).model))
    return weights


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_tiny_gpt_on_variable_length_text_ends_at_the_same_weights_for_any_split(
    precision: str,
) -> None:
    """fp32 within 2e-4 relative, fp64 within 1e-10 (tests/cuda/lane.py says why)."""
    first, *others = finals(**TEXT, **ADAMW, precision=precision, max_steps=10)
    for other in others:
        assert relative_error(other, first) <= TOLERANCES[precision]


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_an_uploaded_text_file_ends_at_the_same_weights_for_any_split(
    precision: str, tmp_path: Path
) -> None:
    """Texts of 2 to 60 characters, 21 rows (windows of 8, 8 and a partial 5), two
    epochs; fp32 within 2e-4 relative, fp64 within 1e-10."""
    files = Files(tmp_path)
    files.jsonl(TRAIN_ID, [{"text": text} for text in variable_length_texts(21)])
    dataset = {"type": "file", "file_id": TRAIN_ID, "max_length": 65, "eval_fraction": 0}
    first, *others = finals(
        files, model=TINY_GPT, dataset=dataset, **ADAMW, precision=precision,
        epochs=2, max_steps=None,
    )  # fmt: skip
    for other in others:
        assert relative_error(other, first) <= TOLERANCES[precision]
