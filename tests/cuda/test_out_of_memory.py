"""A real CUDA out-of-memory error, under torch.cuda.set_per_process_memory_fraction,
is backed off from like an injected one: the micro-batch halves, m·k stays, and the
weights equal those of a run started at the smaller micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cuda.lane import CUDA_LANE, FP32_TOLERANCE

pytestmark = CUDA_LANE

ROOT = Path(__file__).resolve().parents[2]


def test_a_micro_batch_that_does_not_fit_is_halved_and_the_update_stays_exact() -> None:
    """fp32 within 2e-4 relative (tests/cuda/lane.py): to the run started at the smaller
    micro-batch (the same split, so in practice the same bits) and to the window as one
    micro-batch. In a subprocess: the memory cap would outlive this test otherwise."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.cuda.out_of_memory_run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    whole, half, cap = report["peaks_mib"]
    assert half < cap < whole, report  # else the cap could not separate them
    assert report["backoffs"] and report["backoffs"][0] == [32, 16], report
    in_use = report["backoffs"][-1][1]
    assert report["splits"] == [[in_use, 32 // in_use]] * 3, report  # m·k kept
    assert report["samples"] == [32] * 3, report
    assert report["error_to_started_there"] <= FP32_TOLERANCE, report
    assert report["error_to_one_batch"] <= FP32_TOLERANCE, report
