"""Numeric precision: parameter dtype, autocast context and the fp16 grad scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from app.jobs.spec import Precision


@dataclass(frozen=True)
class PrecisionPlan:
    """How one precision setting is carried out on one device."""

    name: Precision
    device: torch.device
    parameter_dtype: torch.dtype
    autocast_dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler passes every call straight through.
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


# Mixed precision: parameters stay fp32, the forward pass runs in the lower precision.
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def plan_precision(name: Precision, device: torch.device) -> PrecisionPlan:
    parameter_dtype = torch.float64 if name == "fp64" else torch.float32
    return PrecisionPlan(name, device, parameter_dtype, _AUTOCAST_DTYPES.get(name))
