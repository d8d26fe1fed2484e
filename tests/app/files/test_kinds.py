"""Which models train on which kind of file (checked at submit against validated files)."""

from __future__ import annotations

from typing import Any

import pytest

from app.files.kinds import model_fit_error
from tests.app.files.stored_files import CLASSIFICATION_STATS, IMAGE_STATS, TEXT_STATS

REGRESSION_STATS = {"rows": 8, "input_shape": [3], "target_size": 1}


@pytest.mark.parametrize(
    ("model", "kind", "stats"),
    [
        ("mlp", "classification", CLASSIFICATION_STATS),
        ("mlp", "regression", REGRESSION_STATS),
        ("mlp", "classification", IMAGE_STATS),  # images flatten for an MLP
        ("cnn", "classification", IMAGE_STATS),
        ("cnn", "regression", IMAGE_STATS | {"target_size": 2}),
        ("tiny-gpt", "text", TEXT_STATS),
        ("tiny-gpt", "prompt_completion", TEXT_STATS),
        ("hf-causal-lm", "text", TEXT_STATS),
        ("hf-causal-lm", "prompt_completion", TEXT_STATS),
        ("hf-causal-lm", "chat", TEXT_STATS),
        ("hf-sequence-classification", "labelled_text", TEXT_STATS | {"classes": 3}),
        ("my-plugin-model", "text", TEXT_STATS),  # plugins: the worker checks
    ],
)
def test_models_fit_the_kinds_they_train_on(model: str, kind: str, stats: dict[str, Any]) -> None:
    assert model_fit_error(model, kind, stats) is None


@pytest.mark.parametrize(
    ("model", "kind", "stats", "says"),
    [
        ("mlp", "text", TEXT_STATS, "model 'mlp' trains on features with a label"),
        ("cnn", "labelled_text", TEXT_STATS, "this file holds JSONL labelled text"),
        ("cnn", "classification", CLASSIFICATION_STATS, "needs images"),
        ("cnn", "regression", REGRESSION_STATS, "shape [3]"),
        ("tiny-gpt", "classification", CLASSIFICATION_STATS, "model 'tiny-gpt' trains on JSONL"),
        ("tiny-gpt", "labelled_text", TEXT_STATS, "labelled text"),
        ("hf-causal-lm", "regression", REGRESSION_STATS, "features with a target"),
        ("hf-sequence-classification", "text", TEXT_STATS, "JSONL text"),
        ("hf-sequence-classification", "classification", CLASSIFICATION_STATS, "features"),
    ],
)
def test_a_model_on_a_kind_it_cannot_train_on_says_what_it_needs(
    model: str,
    kind: str,
    stats: dict[str, Any],
    says: str,
) -> None:
    error = model_fit_error(model, kind, stats)
    assert error is not None and says in error


@pytest.mark.parametrize(
    ("model", "tokenizer", "says"),
    [
        ("tiny-gpt", None, "train them on hf-causal-lm (a pretrained model saved with its"),
        ("hf-sequence-classification", None, "not 'hf-sequence-classification'"),
        ("my-plugin-model", None, "not 'my-plugin-model'"),
        ("hf-causal-lm", "byte", "not dataset.tokenizer 'byte': leave it unset or 'model'"),
        ("hf-causal-lm", "char", "not dataset.tokenizer 'char'"),
    ],
)
def test_chat_needs_a_hugging_face_causal_lm_and_its_own_tokenizer(
    model: str, tokenizer: str | None, says: str
) -> None:
    error = model_fit_error(model, "chat", TEXT_STATS, tokenizer)
    assert error is not None and says in error
    assert error.startswith("JSONL chat conversations")


def test_chat_fits_a_causal_lm_with_its_own_tokenizer() -> None:
    for tokenizer in (None, "model"):
        assert model_fit_error("hf-causal-lm", "chat", TEXT_STATS, tokenizer) is None
