"""Optimizer and learning-rate schedule, both advanced once per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from app.jobs.spec import LrScheduleSpec, OptimizerSpec


def build_optimizer(
    spec: OptimizerSpec, parameters: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
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
