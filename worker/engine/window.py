"""One accumulation window: k micro-batches, one optimizer step. The heart of the engine.

The rules (see docs/accumulation.md for why each one exists):
- every micro-batch adds sum_loss / window_units, where window_units (samples, or
  target tokens that carry loss: not padding, not a prompt) is counted on the host
  before the first backward, so the update equals the one a single batch of the whole
  window would give;
- one unscale, one clip of the whole window's gradient, one optimizer step, one
  scaler update, one scheduler step, one zero_grad per window;
- no host sync inside the micro-batch loop: the loss is summed on the device and
  read once, together with the gradient norm, after the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from worker.engine.data_types import IGNORE_INDEX, Batch, SampleSet
from worker.engine.errors import TrainingError
from worker.engine.hooks import NO_HOOKS, Hooks
from worker.engine.precision import PrecisionPlan


class MicroBatchOutOfMemory(Exception):
    """The window ran out of memory; its graph and partial gradients are already freed."""


@dataclass(frozen=True)
class WindowOutcome:
    loss: float  # the window's summed loss over its units: the same for any (m, k)
    grad_norm: float  # of the whole window's gradient, unscaled, before clipping
    skipped: bool  # fp16 overflow: no update was applied
    scale: float | None  # the fp16 loss scale after a skipped update


@dataclass(frozen=True)
class StepParts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    precision: PrecisionPlan
    grad_clip_norm: float | None

    @cached_property
    def parameters(self) -> list[nn.Parameter]:
        """The model's trained parameters (a LoRA job's frozen weights are left out), listed
        once: walking the module tree every window is a measurable cost for small models
        (bench/loop.py)."""
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    @cached_property
    def foreach_norm(self) -> bool:
        """Whether get_total_norm would take its foreach path in one group: every
        parameter (and so every gradient) plain, on one CPU or CUDA device, in one dtype."""
        first = self.parameters[0] if self.parameters else None
        return first is not None and all(
            type(p) is nn.Parameter
            and p.device == first.device
            and p.dtype == first.dtype
            and p.device.type in ("cpu", "cuda")
            for p in self.parameters
        )


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's outputs; models of padded text also get the batch's attention mask, and
    of packed text its position ids."""
    if batch.attention_mask is None and batch.position_ids is None:
        return cast(torch.Tensor, model(batch.inputs))
    extra = {}
    if batch.attention_mask is not None:
        extra["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        extra["position_ids"] = batch.position_ids
    return cast(torch.Tensor, model(batch.inputs, **extra))


def sum_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch's loss summed over its loss units.

    Integer targets (classes, tokens): cross-entropy, padding targets count for nothing.
    Float targets (regression): squared error summed over each sample's targets, so that
    divided by the samples it is the mean per sample of its squared error. The choice
    reads the dtype only: no host sync.
    """
    if targets.is_floating_point():
        return F.mse_loss(outputs, targets, reduction="sum")
    return F.cross_entropy(
        outputs.flatten(0, -2), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back after an out-of-memory error, so that the
    retry (or the next job in this process) starts from what is really in use."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _forward_backward(
    parts: StepParts, data: SampleSet, indices: list[int], window_units: int, hooks: Hooks
) -> torch.Tensor:
    """One micro-batch: its gradient added to .grad; returns its loss sum, detached.

    A function of its own so that the micro-batch's graph (batch, outputs, loss and the
    activations they hold) is referenced from this frame only: it is freed on return, and
    after an out-of-memory error as soon as the exception (whose traceback holds this
    frame) is gone.
    """
    precision = parts.precision
    batch = data.collate(indices).to(precision.device, precision.parameter_dtype)
    if hooks.before_forward is not None:
        hooks.before_forward(len(indices), batch)
    with precision.autocast():
        outputs = forward(parts.model, batch)
    in_backward = hooks.in_backward
    if in_backward is not None:
        outputs.register_hook(lambda _gradient: in_backward(len(indices), batch))
    loss = sum_loss(outputs.to(precision.parameter_dtype), batch.targets)
    parts.scaler.scale(loss / window_units).backward()
    return loss.detach()


def accumulate_gradients(
    parts: StepParts,
    data: SampleSet,
    micro_batches: list[list[int]],
    hooks: Hooks = NO_HOOKS,
    window_units: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward and backward every micro-batch; returns the window's loss sum and units.

    Afterwards each parameter's .grad holds the (scaled) gradient of the window's mean
    loss over its units, exactly as one batch of the whole window would give it. A rank
    of a group passes the units of the whole window, of which its micro-batches are a part.
    """
    if window_units is None:
        window_units = data.loss_units([index for batch in micro_batches for index in batch])
    if window_units == 0:
        raise TrainingError("invalid_data", "a window has no loss units (all targets are padding)")
    loss_sum = torch.zeros((), dtype=torch.float64, device=parts.precision.device)
    out_of_memory = False
    try:
        for indices in micro_batches:
            loss_sum += _forward_backward(parts, data, indices, window_units, hooks)
    except torch.OutOfMemoryError:
        # Handled after the except block: until then the traceback's frames hold the
        # failed micro-batch's graph, which must be gone before the cache is emptied.
        out_of_memory = True
    if out_of_memory:
        parts.optimizer.zero_grad(set_to_none=True)
        release_cached_memory(parts.precision.device)
        raise MicroBatchOutOfMemory
    return loss_sum, window_units


def gradient_norm(parts: StepParts, gradients: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients, as torch.nn.utils.get_total_norm computes it.

    In the common case the same two kernels, called directly: the same bits, without
    the per-call grouping and checks that cost small models a few percent per step.
    """
    if not gradients or not parts.foreach_norm:
        return torch.nn.utils.get_total_norm(gradients)
    with torch.no_grad():
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gradients, 2.0)), 2.0)


def apply_update(
    parts: StepParts, loss_sum: torch.Tensor, window_units: int, hooks: Hooks = NO_HOOKS
) -> WindowOutcome:
    """Unscale, clip and step once for the window."""
    optimizer, scaler = parts.optimizer, parts.scaler
    scaler.unscale_(optimizer)
    gradients = [p.grad for p in parts.parameters if p.grad is not None]
    grad_norm = gradient_norm(parts, gradients)
    if parts.grad_clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parts.parameters, parts.grad_clip_norm, grad_norm)
    # The one host sync of the window.
    loss_value, norm_value = torch.stack([loss_sum, grad_norm.to(torch.float64)]).tolist()
    # fp16: an inf or NaN gradient means the loss scale overflowed; the scaler skips
    # the update and backs off. Anywhere else a non-finite value is a failed run.
    skipped = scaler.is_enabled() and not math.isfinite(norm_value)
    if not skipped and not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            "nan_loss",
            f"the loss or gradient became non-finite (loss {loss_value}, norm {norm_value})",
        )
    out_of_memory = False
    try:
        if hooks.before_step is not None:
            hooks.before_step()
        # The first step allocates the optimizer's state (AdamW: two values per parameter).
        scaler.step(optimizer)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled outside, as in accumulate_gradients
    if out_of_memory:
        optimizer.zero_grad(set_to_none=True)
        release_cached_memory(parts.precision.device)
        raise TrainingError("out_of_memory", optimizer_out_of_memory_message(parts))
    scaler.update()
    if not skipped:
        parts.scheduler.step()
    # Free the window's gradients: the next window starts from none.
    optimizer.zero_grad(set_to_none=True)
    scale = scaler.get_scale() if skipped else None
    return WindowOutcome(loss_value / window_units, norm_value, skipped, scale)


def optimizer_out_of_memory_message(parts: StepParts) -> str:
    """Why the step ran out of memory, and why a smaller micro-batch would not help."""
    parameters = sum(parameter.numel() for parameter in parts.parameters)
    element = parts.parameters[0].element_size() if parts.parameters else 4
    # Values the optimizer keeps per parameter: AdamW two moments, SGD its momentum.
    state = 1 if parts.optimizer.defaults.get("momentum") else 0
    if isinstance(parts.optimizer, torch.optim.Adam | torch.optim.AdamW):
        state = 2
    # Weights, gradients and state: what the step needs whatever the micro-batch.
    needed = parameters * element * (2 + state)
    name = type(parts.optimizer).__name__
    return (
        f"out of memory in the optimizer step: the optimizer state does not fit. {name} keeps "
        f"{state} value{'s' if state != 1 else ''} per parameter, so the model's "
        f"{parameters:,} parameters need about {needed / 2**30:.2f} GiB for weights, "
        "gradients and optimizer state together. Micro-batching cannot help: a smaller "
        "micro-batch shrinks only activations, which are freed before the step. Use a "
        "smaller model, an optimizer with less state (sgd) or a device with more memory"
    )
