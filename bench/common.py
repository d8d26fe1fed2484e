"""What the benchmarks share: the machine they ran on, a process's memory, tables, and a
text data set of long sequences."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "worker" / "engine" / "data" / "tiny_text.txt"
# Any well-formed id: the benchmarks' FileSource maps it to their own local file.
TEXT_FILE_ID = "file_" + "0" * 24


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_lines(packages: Sequence[str]) -> list[str]:
    """The lines a results section starts with: date, CPU, cores, Python, package versions."""
    versions = ", ".join(f"{name} {package_version(name)}" for name in packages)
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Linux {platform.release()}",
        f"python {platform.python_version()}, {versions}",
    ]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns right-aligned to their widest cell, the first one left-aligned."""
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    return [line(header), *(line(row) for row in rows)]


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB, e.g. VmHWM (the peak resident set so far)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_text_rows(path: Path, rows: int, tokens: int) -> None:
    """`rows` JSON lines {"text": ...} of `tokens` characters of the shipped corpus each,
    every row from its own offset (wrapping around). The corpus is ASCII, so byte-level
    every row is exactly `tokens` tokens: tiny-text holds only 14 sequences of 513."""
    corpus = CORPUS.read_text(encoding="ascii")
    repeated = corpus * (tokens // len(corpus) + 2)
    with path.open("w", encoding="ascii") as out:
        for row in range(rows):
            start = (row * 997) % len(corpus)  # a prime stride: rows start all over the text
            out.write(json.dumps({"text": repeated[start : start + tokens]}) + "\n")


def text_file_dataset(tokens: int) -> dict[str, Any]:
    """The data set spec of a write_text_rows file: byte-level, every row one sequence of
    `tokens` tokens (tokens - 1 model inputs), nothing held out."""
    return {
        "type": "file",
        "file_id": TEXT_FILE_ID,
        "format": "jsonl",
        "max_length": tokens,
        "tokenizer": "byte",
        "eval_fraction": 0.0,
    }


def local_files(path: Path) -> Callable[[str], Path]:
    """A FileSource (worker/datafiles/load.py) that serves `path` for TEXT_FILE_ID."""

    def source(file_id: str) -> Path:
        if file_id != TEXT_FILE_ID:
            raise KeyError(file_id)
        return path

    return source
