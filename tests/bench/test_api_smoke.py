"""bench/api.py's smoke run: every measurement at a tiny scale, so the script cannot rot.

No thresholds: a shared CI machine says nothing about throughput or latency. The smoke
run still checks what must hold anywhere: no request answered an error and every event
stream received every event of its job (the script exits 1 otherwise).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_api_smoke_run_measures_everything_and_prints_the_table() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "api.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    out = finished.stdout
    assert "measurement" in out and "target" in out
    for row in ("(a) submit", "(b) bare GET", "job GET / bare", "(c) GET /v1/jobs", "(d) dispatch"):
        assert row in out, row
    assert "(e) 5 streams x 5 steps" in out
    assert re.search(r"streams that got every event +5/5 ", out)
    assert "PROBLEM" not in out
