"""bench/loop.py's smoke run: every variant trains a tiny model, so the script cannot rot.

No thresholds: a shared CI machine says nothing about throughput. The smoke run still
checks what must hold anywhere, that all four variants end at the same weights (the
script exits 1 otherwise).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_loop_smoke_run_trains_every_variant_to_the_same_weights() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loop.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    rates, ratios = (line for line in lines if line.startswith("model "))
    for column in ("hand/s", "engine/s", "accelerate/s", "lightning/s"):
        assert column in rates
    for column in ("engine", "accelerate", "lightning", "engine cpu", "max |Δw|/max|w|"):
        assert column in ratios
    # One row per k (1 and 4) in each table.
    assert sum(line.startswith("smoke ") for line in lines) == 4
    assert any(line.startswith("same weights") and ": yes" in line for line in lines)
