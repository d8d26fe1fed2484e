"""Reading a job spec from a JSON or YAML file, with one line per bad field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from app.jobs.spec import JobSpec, validation_messages


class SpecFileError(Exception):
    def __init__(self, path: Path, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.path = path
        self.lines = lines


def load_spec_file(path: Path) -> JobSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecFileError(path, [f"cannot read {path}: {error.strerror}"]) from error
    try:
        data: Any = (
            yaml.safe_load(text) if path.suffix.lower() in {".yaml", ".yml"} else json.loads(text)
        )
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SpecFileError(path, [f"{path} is not valid {_format_name(path)}: {error}"]) from error
    if not isinstance(data, dict):
        raise SpecFileError(path, [f"{path} must hold one object (a mapping of fields)"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecFileError(path, validation_messages(error)) from error


def _format_name(path: Path) -> str:
    return "YAML" if path.suffix.lower() in {".yaml", ".yml"} else "JSON"
