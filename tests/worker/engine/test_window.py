"""The window's gradient equals the single full-batch gradient, for every (m, k)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from app.jobs.spec import TinyGptSpec
from worker.engine.data_types import IGNORE_INDEX, DataInfo, SampleSet, TokenSequenceSet
from worker.engine.hooks import Hooks
from worker.engine.models import build_tiny_gpt
from worker.engine.optim import build_optimizer, build_scheduler
from worker.engine.precision import plan_precision
from worker.engine.trainer import prepare_run
from worker.engine.window import StepParts, accumulate_gradients

from .conftest import assert_close_relative, make_spec

SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]


def reference_gradient(model: torch.nn.Module, data: SampleSet, indices: list[int]) -> torch.Tensor:
    """Plain PyTorch: one batch of the whole window, mean over its loss units."""
    model = copy.deepcopy(model)
    batch = data.collate(indices)
    inputs = batch.inputs.double() if batch.inputs.is_floating_point() else batch.inputs
    logits = model(inputs)
    loss = F.cross_entropy(
        logits.flatten(0, -2), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="mean"
    )
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def window_gradient(
    parts: StepParts, data: SampleSet, indices: list[int], micro: int
) -> torch.Tensor:
    micro_batches = [indices[i : i + micro] for i in range(0, len(indices), micro)]
    accumulate_gradients(parts, data, micro_batches)
    gradient = torch.cat([p.grad.flatten() for p in parts.model.parameters()])
    parts.optimizer.zero_grad(set_to_none=True)
    return gradient


@pytest.mark.parametrize(("micro", "steps"), SPLITS, ids=[f"m{m}k{k}" for m, k in SPLITS])
def test_mlp_window_gradient_equals_full_batch_gradient(micro: int, steps: int) -> None:
    run = prepare_run(make_spec(precision="fp64", micro_batch_size=micro, accumulation_steps=steps))
    indices = list(range(8))
    expected = reference_gradient(run.parts.model, run.data.train, indices)
    actual = window_gradient(run.parts, run.data.train, indices, micro)
    assert_close_relative(actual, expected, 1e-10)


def adversarial_text() -> TokenSequenceSet:
    """One long sequence and seven short ones: a per-micro-batch mean gets this badly wrong."""
    generator = torch.Generator().manual_seed(3)
    lengths = [3, 61, 4, 2, 5, 3, 6, 2]
    return TokenSequenceSet([torch.randint(1, 20, (n,), generator=generator) for n in lengths])


def tiny_gpt_parts() -> StepParts:
    torch.manual_seed(0)
    spec = TinyGptSpec(n_layer=2, n_head=2, n_embd=16, block_size=64)
    model = build_tiny_gpt(spec, DataInfo(vocab_size=20)).double()
    optimizer = build_optimizer(make_spec().optimizer, model.parameters())
    scheduler = build_scheduler(make_spec().lr_schedule, optimizer, 10)
    precision = plan_precision("fp64", torch.device("cpu"))
    return StepParts(model, optimizer, scheduler, precision.grad_scaler(), precision, None)


@pytest.mark.parametrize(("micro", "steps"), SPLITS, ids=[f"m{m}k{k}" for m, k in SPLITS])
def test_tiny_gpt_window_gradient_equals_full_batch_on_variable_lengths(
    micro: int, steps: int
) -> None:
    parts, data = tiny_gpt_parts(), adversarial_text()
    indices = list(range(8))
    expected = reference_gradient(parts.model, data, indices)
    actual = window_gradient(parts, data, indices, micro)
    assert_close_relative(actual, expected, 1e-10)


def test_per_micro_batch_mean_would_be_wrong_on_this_window() -> None:
    """Guards the test above: the adversarial window does tell the naive rule apart."""
    parts, data = tiny_gpt_parts(), adversarial_text()
    expected = reference_gradient(parts.model, data, list(range(8)))
    model = copy.deepcopy(parts.model)
    for pair in ([0, 1], [2, 3], [4, 5], [6, 7]):
        batch = data.collate(pair)
        loss = F.cross_entropy(
            model(batch.inputs).flatten(0, -2), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )
        (loss / 4).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (naive - expected).norm() / expected.norm() > 0.1


def test_units_are_counted_before_the_first_backward() -> None:
    """Each micro-batch's backward already uses the whole window's count."""
    parts, data = tiny_gpt_parts(), adversarial_text()
    seen_grads: list[torch.Tensor | None] = []

    def record(size: int, batch: object) -> None:
        first = next(parts.model.parameters())
        seen_grads.append(None if first.grad is None else first.grad.clone())

    accumulate_gradients(
        parts, data, [[0, 1], [2, 3], [4, 5], [6, 7]], Hooks(before_forward=record)
    )
    first_half = seen_grads[1]
    assert first_half is not None
    reference = copy.deepcopy(parts.model)
    reference.zero_grad(set_to_none=True)
    batch = data.collate([0, 1])
    loss = F.cross_entropy(
        reference(batch.inputs).flatten(0, -2),
        batch.targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    (loss / data.loss_units(list(range(8)))).backward()
    assert_close_relative(first_half, next(reference.parameters()).grad, 1e-12)
