"""The CUDA lane (`pytest -m cuda`): tests that need a GPU, each module marked with
tests/cuda/lane.py's CUDA_LANE. The one test here that is not (test_lane.py) checks, on
a CPU machine, that the lane skips cleanly with its reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _device_memory_handed_back() -> Iterator[None]:
    # Each test starts from an empty cache: a test that measures or caps memory must not
    # see another's blocks.
    yield
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
