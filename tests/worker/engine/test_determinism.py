"""`deterministic=True` (TRAINJOB_DETERMINISTIC) turns on PyTorch's deterministic
algorithms and pins cuBLAS's workspace before the run touches a device; a workspace the
operator chose is kept. Each case in a fresh process: the mode cannot be undone there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CODE = """
import json, os, torch
from tests.worker.engine.conftest import make_spec
from worker.engine.trainer import train
before = torch.are_deterministic_algorithms_enabled()
result = train(make_spec(max_steps=2), deterministic={deterministic})
print(json.dumps([before, torch.are_deterministic_algorithms_enabled(),
                  os.environ.get("CUBLAS_WORKSPACE_CONFIG"), result.step]))
"""


def run(deterministic: bool, workspace: str | None) -> list[object]:
    env = {key: value for key, value in os.environ.items() if key != "CUBLAS_WORKSPACE_CONFIG"}
    env |= {"CUBLAS_WORKSPACE_CONFIG": workspace} if workspace else {}
    result = subprocess.run(
        [sys.executable, "-c", CODE.format(deterministic=deterministic)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer: list[object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.parametrize(
    ("deterministic", "workspace", "expected"),
    [
        (False, None, [False, False, None, 2]),
        (True, None, [False, True, ":4096:8", 2]),
        (True, ":16:8", [False, True, ":16:8", 2]),
    ],
)
def test_deterministic_runs_turn_the_mode_on_and_pin_the_cublas_workspace(
    deterministic: bool, workspace: str | None, expected: list[object]
) -> None:
    assert run(deterministic, workspace) == expected
