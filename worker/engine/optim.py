"""Optimizer and learning-rate schedule, both advanced once per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
from torch.optim.lr_scheduler import LambdaLR

from app.jobs.spec import LrScheduleSpec, OptimizerSpec
from worker.engine.quantize import import_bitsandbytes


def build_optimizer(
    spec: OptimizerSpec, parameters: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    if spec.type == "adamw8bit":
        # CUDA only: the run checked its device before it built anything (quantize.py).
        # Block-wise 8-bit moments for every tensor of 4,096 elements or more (bitsandbytes'
        # min_8bit_size); smaller ones keep 32-bit moments, as bitsandbytes decides.
        bitsandbytes = import_bitsandbytes("optimizer.type 'adamw8bit' needs")
        return cast(
            torch.optim.Optimizer,
            bitsandbytes.optim.AdamW8bit(
                parameters, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
            ),
        )
    if spec.type == "adamw":
        return torch.optim.AdamW(
            parameters, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
        )
    return torch.optim.SGD(
        parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


def lr_factor(spec: LrScheduleSpec, step: int, total_steps: int) -> float:
    """The multiplier of the base rate for the update after `step` earlier updates."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.type == "constant":
        return 1.0
    progress = min((step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps), 1.0)
    if spec.type == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    spec: LrScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(spec, step, total_steps))
