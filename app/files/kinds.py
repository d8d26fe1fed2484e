"""Which models can train on which kind of file: checked at submit, once the file is valid.

A file's kind (text, prompt_completion, chat, labelled_text, classification, regression) and
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
    "hf-causal-lm": ("text", "prompt_completion", "chat"),
    "hf-sequence-classification": ("labelled_text",),
}
KIND_DESCRIPTIONS = {
    "text": 'JSONL text ({"text": ...} per line)',
    "prompt_completion": 'JSONL prompts and completions ({"prompt": ..., "completion": ...})',
    "chat": 'JSONL chat conversations ({"messages": [{"role": ..., "content": ...}, ...]})',
    "labelled_text": 'JSONL labelled text ({"text": ..., "label": ...})',
    "classification": "features with a label (CSV or NPZ)",
    "regression": "features with a target (CSV or NPZ)",
}
# A convolution's input: channels × height × width per sample.
IMAGE_DIMENSIONS = 3


def describe_kind(kind: str) -> str:
    return KIND_DESCRIPTIONS.get(kind, repr(kind))


def model_fit_error(
    model_type: str, kind: str, stats: dict[str, Any], tokenizer: str | None = None
) -> str | None:
    """Why a model of `model_type` cannot train on a valid file of `kind` tokenized with
    `tokenizer` (the spec's dataset.tokenizer); None if it can.

    Plugin models are not checked: the worker validates them when it builds.
    """
    if kind == "chat":
        return _chat_fit_error(model_type, tokenizer)
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


def _chat_fit_error(model_type: str, tokenizer: str | None) -> str | None:
    """Chat rows are rendered with the chat template of the model's own tokenizer: only a
    Hugging Face causal LM has one (whether its saved tokenizer does is the worker's to
    find). A plugin model cannot be given a template either."""
    if model_type != "hf-causal-lm":
        return (
            f"{describe_kind('chat')} are rendered with the chat template of a Hugging Face "
            f"model's tokenizer: train them on hf-causal-lm (a pretrained model saved with "
            f"its tokenizer), not {model_type!r}"
        )
    if tokenizer in ("byte", "char"):
        return (
            f"{describe_kind('chat')} are rendered with the chat template of the model's own "
            f"tokenizer, not dataset.tokenizer {tokenizer!r}: leave it unset or 'model'"
        )
    return None
