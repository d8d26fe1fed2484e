"""bench/memory.py's smoke run: children measure, the table prints, the plot is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_memory_smoke_run_prints_both_series_and_writes_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "memory.png"
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--smoke", "--out", str(plot)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    header = next(line for line in lines if line.startswith("k "))
    assert "(m,k)" in header and "(m·k,1)" in header
    assert [line.split()[0] for line in lines[lines.index(header) + 1 :][:2]] == ["1", "2"]
    assert plot.read_bytes().startswith(b"\x89PNG")
