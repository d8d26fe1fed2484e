"""On a machine without CUDA, `pytest -m cuda` collects the whole lane and skips every
test with its reason, and exits 0 (pytest exits 5 when it collects nothing). Not marked
`cuda`: it runs in the normal suite, and the lane's own run deselects it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cuda.lane import NO_CUDA

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the lane runs instead")
def test_the_cuda_lane_skips_every_test_with_its_reason_without_cuda() -> None:
    lane = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-rs",
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert lane.returncode == 0, lane.stdout + lane.stderr
    summary = lane.stdout.strip().splitlines()[-1]
    counted = re.fullmatch(r"=*\s*(\d+) skipped, (\d+) deselected in [\d.]+s\s*=*", summary)
    assert counted, summary  # nothing passed, failed or errored: only skips
    assert int(counted[1]) >= 10 and int(counted[2]) == 1, summary
    reasons = [line for line in lane.stdout.splitlines() if line.startswith("SKIPPED [")]
    assert reasons and all(line.endswith(NO_CUDA) for line in reasons), lane.stdout
    assert sum(int(re.match(r"SKIPPED \[(\d+)\]", line)[1]) for line in reasons) == int(counted[1])
