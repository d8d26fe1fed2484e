from __future__ import annotations

from typing import Any

import pytest
import torch

from app.jobs.spec import JobSpec


def make_spec(**overrides: Any) -> JobSpec:
    """A small valid spec; keyword arguments replace top-level fields."""
    spec: dict[str, Any] = {
        "model": {"type": "mlp", "hidden_sizes": [16]},
        "dataset": {"type": "synthetic-classification", "n_samples": 96, "n_features": 6},
        "micro_batch_size": 4,
        "accumulation_steps": 2,
        "max_steps": 5,
        "device": "cpu",
    }
    spec.update(overrides)
    return JobSpec.model_validate(spec)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    error = (actual - expected).norm() / expected.norm()
    assert error <= tolerance, f"relative error {error:.3e} above {tolerance:.0e}"


@pytest.fixture(autouse=True)
def _one_thread_for_determinism() -> None:
    # Bit-for-bit comparisons across runs want the same reduction order every time.
    torch.set_num_threads(1)
