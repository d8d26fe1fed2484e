"""Reading a job spec file (JSON, or YAML for .yaml/.yml and standard input) as the mapping
that `trainjob submit` posts and `trainjob run` validates."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


class SpecFileError(Exception):
    """A spec that cannot be used, with one line per reason (per bad field)."""

    def __init__(self, path: str | Path, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.path = path
        self.lines = lines


def read_spec(path: str | Path) -> dict[str, Any]:
    """The file's mapping, unvalidated; `-` reads standard input (YAML holds JSON)."""
    yaml_file = str(path) == "-" or Path(path).suffix.lower() in {".yaml", ".yml"}
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise SpecFileError(path, [f"cannot read {path}: {error.strerror}"]) from error
    except UnicodeDecodeError as error:
        raise SpecFileError(path, [f"cannot read {path}: not UTF-8 text"]) from error
    try:
        data = yaml.safe_load(text) if yaml_file else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = "YAML" if yaml_file else "JSON"
        raise SpecFileError(path, [f"{path} is not valid {kind}: {error}"]) from error
    if not isinstance(data, dict):
        raise SpecFileError(path, [f"{path} must hold one object (a mapping of fields)"])
    return data
