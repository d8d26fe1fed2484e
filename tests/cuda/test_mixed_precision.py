"""bf16 and fp16 autocast on CUDA against an fp32 run, and fp16's loss scaler: an
overflow skips the update, leaves the scheduler where it was, and the scaler recovers."""

from __future__ import annotations

import pytest
import torch

from tests.cuda.lane import CUDA_LANE, flat_weights
from tests.worker.engine.conftest import make_spec
from tests.worker.engine.test_trainer import TEXT
from worker.engine.trainer import Callbacks, StepMetrics, drive, prepare_run, train

pytestmark = CUDA_LANE

GPT = {**TEXT, "model": {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 64}}
# Per step, |loss - fp32 loss| / fp32 loss. bf16 keeps 8 bits of mantissa (0.4% per
# rounding), fp16 11 bits; over 20 small AdamW steps the curves stay within a few tenths
# of a percent. 5% fails a broken cast (fp16 logits summed in fp16, a lost scaler
# unscale: those are off by far more) without flaking on rounding.
CURVE_TOLERANCE = 0.05


def loss_curve(precision: str) -> list[StepMetrics]:
    metrics: list[StepMetrics] = []
    spec = make_spec(
        **GPT, precision=precision, device="cuda", micro_batch_size=4, accumulation_steps=2,
        max_steps=20, optimizer={"type": "adamw", "lr": 0.001},
    )  # fmt: skip
    train(spec, Callbacks(on_step=metrics.append))
    return metrics


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_loss_curve_follows_fp32(precision: str) -> None:
    """Every step's loss within 5% of the fp32 run's (CURVE_TOLERANCE says why); fp16
    may skip an early step or two while its scale settles from 2**16."""
    reference = [m.loss for m in loss_curve("fp32")]
    metrics = loss_curve(precision)
    assert reference[-1] < 0.9 * reference[0], "fp32 did not learn: nothing to compare"
    assert sum(m.skipped for m in metrics) <= (2 if precision == "fp16" else 0)
    losses = [m.loss for m in metrics]
    for step, (mixed, exact) in enumerate(zip(losses, reference, strict=True), 1):
        assert abs(mixed - exact) <= CURVE_TOLERANCE * exact, (step, mixed, exact)


def test_fp16_overflow_skips_the_update_holds_the_schedule_and_the_scaler_recovers() -> None:
    """A loss scale of 2**40 overflows fp16 gradients (max 65504) on the first window:
    each overflow halves it, until it fits. Exact checks: skipped steps leave the
    weights bit-identical and the learning rate (a warm-up) where it was."""
    spec = make_spec(
        **GPT, precision="fp16", device="cuda", micro_batch_size=4, accumulation_steps=2,
        max_steps=45, optimizer={"type": "adamw", "lr": 0.001},
        lr_schedule={"type": "linear", "warmup_steps": 5},
    )  # fmt: skip
    run = prepare_run(spec)
    scaler = run.parts.scaler
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**40})
    weights = [flat_weights(run.parts.model)]
    metrics: list[StepMetrics] = []

    def on_step(step: StepMetrics) -> None:
        metrics.append(step)
        weights.append(flat_weights(run.parts.model))

    drive(run, Callbacks(on_step=on_step))
    skipped = [m.skipped for m in metrics]
    assert skipped[0], "a scale of 2**40 did not overflow"
    first_taken = skipped.index(False)
    # The scaler halves the scale per overflow: it settles once, then trains on.
    assert len(skipped) - first_taken >= 10 and sum(skipped[first_taken:]) <= 2
    for step, was_skipped in enumerate(skipped):
        if was_skipped:
            assert torch.equal(weights[step + 1], weights[step]), f"step {step + 1} moved"
    # No scheduler step for a skipped update: the warm-up starts at the first real one.
    lrs = [m.lr for m in metrics]
    assert lrs[: first_taken + 1] == [lrs[0]] * (first_taken + 1)
    assert lrs[first_taken + 1] > lrs[first_taken]
    assert run.parts.scheduler.last_epoch == len(skipped) - sum(skipped)
    assert scaler.get_scale() <= 2.0**40 / 2**first_taken
    assert metrics[-1].loss < metrics[first_taken].loss
