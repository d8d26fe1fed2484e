"""bench/packing.py's smoke run: both variants train an epoch and the table prints.

No thresholds on time (a shared CI machine says nothing about speed); what holds
anywhere does: the same real tokens either way, and packing pads less.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_packing_smoke_run_counts_the_same_tokens_with_less_padding() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "packing.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    rows = {
        line.split()[0]: line.split() for line in lines if line.startswith(("unpacked", "packed "))
    }
    # variant, samples, steps, real tokens, padded, ...
    assert rows["packed"][3] == rows["unpacked"][3]
    assert int(rows["packed"][4].replace(",", "")) < int(rows["unpacked"][4].replace(",", ""))
    assert int(rows["packed"][1]) < int(rows["unpacked"][1])
    assert any(line.startswith("packed/unpacked real tokens/s:") for line in lines)
