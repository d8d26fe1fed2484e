"""Which models can train on which kind of file: checked at submit, once the file is valid.

A file's kind (text, prompt_completion, labelled_text, classification, regression) and
its stats are found by validation; the spec alone cannot tell them, so this check runs
against the file's row rather than in the spec's validators. Pure python: the API
imports it.
"""

from __future__ import annotations

from typing import Any

# The kinds each built-in model trains on, and what to call them in an error.
MODEL_KINDS: dict[str, tuple[str, ...]] = {
    "mlp": ("classification", "regression"),
    "cnn": ("classification", "regression"),
    "tiny-gpt": ("text", "prompt_completion"),
    "hf-causal-lm": ("text", "prompt_completion"),
    "hf-sequence-classification": ("labelled_text",),
}
KIND_DESCRIPTIONS = {
    "text": 'JSONL text ({"text": ...} per line)',
    "prompt_completion": 'JSONL prompts and completions ({"prompt": ..., "completion": ...})',
    "labelled_text": 'JSONL labelled text ({"text": ..., "label": ...})',
    "classification": "features with a label (CSV or NPZ)",
    "regression": "features with a target (CSV or NPZ)",
}
# A convolution's input: channels × height × width per sample.
IMAGE_DIMENSIONS = 3


def describe_kind(kind: str) -> str:
    return KIND_DESCRIPTIONS.get(kind, repr(kind))


def model_fit_error(model_type: str, kind: str, stats: dict[str, Any]) -> str | None:
    """Why a model of `model_type` cannot train on a valid file of `kind`; None if it can.

    Plugin models are not checked: the worker validates them when it builds.
    """
    kinds = MODEL_KINDS.get(model_type)
    if kinds is None:
        return None
    if kind not in kinds:
        wanted = " or ".join(describe_kind(each) for each in kinds)
        return f"model {model_type!r} trains on {wanted}; this file holds {describe_kind(kind)}"
    if model_type == "cnn":
        shape = stats.get("input_shape")
        if not isinstance(shape, list) or len(shape) != IMAGE_DIMENSIONS:
            return (
                "model 'cnn' needs images: NPZ arrays `x` of shape N×C×H×W; "
                f"this file's samples have shape {shape}"
            )
    return None
