"""A job spec as MLflow params: one flat key per value, within MLflow's limits.

Pure Python, no MLflow import: what is logged is decided here and tested without a
server. MLflow keys may hold alphanumerics, `_ - . /`, spaces and colons, up to 250
characters, and values up to 6,000 characters (mlflow/utils/validation.py); a spec's
keys are mostly field names, but `metadata`, a Hugging Face `config` and a plugin's
fields are the user's own.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_KEY_LENGTH = 250
MAX_VALUE_LENGTH = 6000
# Slashes are allowed by MLflow but read as paths (no "a//b", no "../"): replaced too,
# with colons, which Windows servers refuse.
_UNSAFE_KEY_CHARACTERS = re.compile(r"[^A-Za-z0-9_.\- ]")


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested objects as dotted keys ({"model": {"type": "mlp"}} → {"model.type": "mlp"}).
    Lists and scalars are values: strings as they are, anything else as JSON; an empty
    object is the value "{}"."""
    if isinstance(value, dict) and value:
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value if isinstance(value, str) else json.dumps(value, sort_keys=True)}


def mlflow_key(key: str) -> str:
    """`key` as MLflow accepts it: unsafe characters replaced by "_", cut to the limit."""
    return _UNSAFE_KEY_CHARACTERS.sub("_", key)[:MAX_KEY_LENGTH]


def mlflow_value(value: str) -> str:
    """`value` within MLflow's limit: cut, its end saying so."""
    if len(value) <= MAX_VALUE_LENGTH:
        return value
    marker = "…(cut)"
    return value[: MAX_VALUE_LENGTH - len(marker)] + marker


def spec_params(spec: dict[str, Any]) -> dict[str, str]:
    """The params of a job's stored spec (its JSON form, every default spelled out), the
    `tracking` section left out. Two keys that end up the same after their characters
    are replaced keep the first value."""
    params: dict[str, str] = {}
    for key, value in flatten({k: v for k, v in spec.items() if k != "tracking"}).items():
        params.setdefault(mlflow_key(key), mlflow_value(value))
    return params
