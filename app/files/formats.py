"""The formats a data file can have, and which one a file's name says it is."""

from __future__ import annotations

from typing import Literal, get_args

FileFormat = Literal["jsonl", "csv", "npz"]
FORMATS: tuple[str, ...] = get_args(FileFormat)

# JSON Lines is often saved as .json; a JSON array in a .json file fails validation.
_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".npz": "npz"}


def detect_format(filename: str) -> str | None:
    """The format the file's name says (".jsonl"/".json" → jsonl, ".csv", ".npz"), or None."""
    _, dot, suffix = filename.rpartition(".")
    return _BY_SUFFIX.get(f".{suffix.lower()}") if dot else None
