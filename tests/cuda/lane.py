"""What every test of the CUDA lane carries: the `cuda` marker, and a skip that says why
where there is no CUDA device (`pytest -m cuda` on a CPU machine skips them all)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False (CPU-only torch build or no GPU)"
CUDA_LANE = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

# fp32: another split ((m, k) against (m·k, 1)) sums in another order, which differs in
# the last bits of each reduction. AdamW then divides each gradient by the root of its
# second moment, so parameters with tiny gradients (embedding rows of rare tokens) see
# that rounding magnified: the same tests in fp32 on the CPU end 1e-5 to 4e-5 apart
# (tiny-gpt, 10 AdamW steps with clipping). 2e-4 leaves room for GPU kernels and still
# fails a wrong normaliser (a per-micro-batch mean moves the weights by around 1e-2).
FP32_TOLERANCE = 2e-4
# fp64: the same reasoning 9 digits further down, as the CPU tests use.
FP64_TOLERANCE = 1e-10


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters as one vector on the host."""
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).norm() / expected.norm()).item())


def cuda(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "device": "cuda"}
