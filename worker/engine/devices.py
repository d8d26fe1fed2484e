"""Which device a run uses; asking for CUDA where there is none fails at start."""

from __future__ import annotations

import torch

from app.jobs.spec import Device
from worker.engine.errors import TrainingError


def resolve_device(requested: Device) -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(
                "invalid_device",
                "device 'cuda' was requested but CUDA is not available on this machine; "
                "use device 'auto' or 'cpu'",
            )
        return torch.device("cuda")
    if requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
