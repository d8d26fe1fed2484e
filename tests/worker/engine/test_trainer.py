"""The training loop: exact updates over many steps, partial windows, once-per-window
state, fp16 overflow, out-of-memory backoff, stop and resume, and real learning."""

from __future__ import annotations

import copy
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from app.jobs.spec import JobSpec
from worker.engine.batching import epoch_order
from worker.engine.checkpoint import Checkpoint, LiveCheckpoint
from worker.engine.data_types import Batch
from worker.engine.errors import TrainingError
from worker.engine.hooks import Hooks
from worker.engine.trainer import Callbacks, StepMetrics, drive, prepare_run, train

from .conftest import assert_close_relative, flat_parameters, make_spec

SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]


def weights_vector(weights: bytes) -> torch.Tensor:
    tensors = load_safetensors(weights)
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


TEXT = {
    "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
    "dataset": {"type": "tiny-text", "min_length": 2, "max_length": 33},
}
CLASSIFICATION = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "synthetic-classification", "n_samples": 96, "n_features": 6},
}
OPTIMIZERS = {
    "sgd": {"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9}},
    "adamw": {
        "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
        "lr_schedule": {"type": "cosine", "warmup_steps": 3},
        "grad_clip_norm": 0.5,
    },
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("task", ["classification", "text"])
def test_ten_steps_of_any_split_end_at_the_same_weights(task: str, optimizer: str) -> None:
    base = {**(CLASSIFICATION if task == "classification" else TEXT), **OPTIMIZERS[optimizer]}
    finals = []
    for micro, steps in SPLITS:
        spec = make_spec(
            **base, precision="fp64", micro_batch_size=micro, accumulation_steps=steps, max_steps=10
        )
        finals.append(weights_vector(train(spec).weights))
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-9)


def test_logged_loss_is_the_same_for_any_split() -> None:
    losses = []
    for micro, steps in [(8, 1), (2, 4)]:
        metrics: list[StepMetrics] = []
        spec = make_spec(**TEXT, precision="fp64", micro_batch_size=micro, accumulation_steps=steps)
        train(spec, Callbacks(on_step=metrics.append))
        losses.append(torch.tensor([m.loss for m in metrics], dtype=torch.float64))
    assert_close_relative(losses[1], losses[0], 1e-12)


def manual_sgd_epochs(spec: JobSpec, epochs: int) -> torch.Tensor:
    """A hand-written reference: each window (the short tail too) is one mean-loss batch."""
    run = prepare_run(spec)
    model, data, lr = copy.deepcopy(run.parts.model), run.data.train, spec.optimizer.lr
    for epoch in range(epochs):
        order = epoch_order(len(data), spec.seed, epoch)
        for start in range(0, len(order), spec.window_size):
            batch = data.collate(order[start : start + spec.window_size])
            loss = F.cross_entropy(model(batch.inputs.double()), batch.targets)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter -= lr * parameter.grad
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_last_partial_window_is_a_full_batch_step_on_the_tail() -> None:
    # 96 samples, 10% held out: 86 train = 10 windows of 8 and a tail of 6.
    spec = make_spec(
        **CLASSIFICATION,
        precision="fp64",
        micro_batch_size=4,
        accumulation_steps=2,
        epochs=2,
        max_steps=None,
        optimizer={"type": "sgd", "lr": 0.2},
    )
    run = prepare_run(spec)
    assert len(run.data.train) % spec.window_size != 0
    metrics: list[StepMetrics] = []
    drive(run, Callbacks(on_step=metrics.append))
    assert [m.samples_seen for m in metrics][9:12] == [80, 86, 94]
    assert_close_relative(flat_parameters(run.parts.model), manual_sgd_epochs(spec, 2), 1e-10)
    # No gradient survives a window, so none leaks into the next epoch.
    assert all(p.grad is None for p in run.parts.model.parameters())


def test_a_partial_window_reports_the_full_windows_split_and_its_own_size() -> None:
    # 86 train samples in windows of 8 = 2 × 4: ten full windows, then a tail of 6, cut
    # into three micro-batches; the job's split is still 2 × 4, not 2 × 3.
    spec = make_spec(micro_batch_size=2, accumulation_steps=4, epochs=1, max_steps=None)
    metrics: list[StepMetrics] = []
    train(spec, Callbacks(on_step=metrics.append))
    assert [m.window_samples for m in metrics] == [8] * 10 + [6]
    assert {(m.micro_batch_size, m.accumulation_steps) for m in metrics} == {(2, 4)}


def test_optimizer_scheduler_and_scaler_step_once_per_window() -> None:
    spec = make_spec(
        precision="fp16",
        micro_batch_size=2,
        accumulation_steps=4,
        max_steps=6,
        lr_schedule={"type": "linear", "warmup_steps": 2},
    )
    run = prepare_run(spec)
    counts = {"optimizer": 0, "zero_grad": 0, "scaler_update": 0}
    run.parts.optimizer.register_step_post_hook(
        lambda *_: counts.__setitem__("optimizer", counts["optimizer"] + 1)
    )
    zero_grad, update = run.parts.optimizer.zero_grad, run.parts.scaler.update

    def counting_zero_grad(set_to_none: bool = True) -> None:
        counts["zero_grad"] += 1
        zero_grad(set_to_none=set_to_none)

    def counting_update(new_scale: Any = None) -> None:
        counts["scaler_update"] += 1
        update(new_scale)

    run.parts.optimizer.zero_grad = counting_zero_grad  # type: ignore[method-assign]
    run.parts.scaler.update = counting_update  # type: ignore[method-assign]
    metrics: list[StepMetrics] = []
    drive(run, Callbacks(on_step=metrics.append))
    assert counts == {"optimizer": 6, "zero_grad": 6, "scaler_update": 6}
    assert run.parts.scheduler.last_epoch == 6
    # Warmup over two optimizer steps (not micro-batches), then linear decay.
    assert [round(m.lr, 6) for m in metrics[:3]] == [0.025, 0.05, 0.05]


def test_fp16_overflow_in_one_micro_batch_skips_exactly_one_update() -> None:
    spec = make_spec(precision="fp16", micro_batch_size=2, accumulation_steps=4, max_steps=5)
    run = prepare_run(spec)
    calls = {"count": 0}

    def poison_the_tenth_micro_batch(size: int, batch: Batch) -> None:
        calls["count"] += 1
        if calls["count"] == 10:  # step 3, second micro-batch
            batch.inputs[0, 0] = float("inf")

    events: list[tuple[str, dict[str, Any]]] = []
    scales: list[float] = []
    initial_scale = run.parts.scaler.get_scale()
    drive(
        run,
        Callbacks(
            on_event=lambda kind, data: events.append((kind, data)),
            on_step=lambda _: scales.append(run.parts.scaler.get_scale()),
        ),
        hooks=Hooks(before_forward=poison_the_tenth_micro_batch),
    )
    overflow = [data for kind, data in events if kind == "overflow_skip"]
    assert overflow == [{"step": 3, "scale": initial_scale / 2}]
    assert scales == [initial_scale] * 2 + [initial_scale / 2] * 3
    assert run.progress.skipped_updates == 1
    assert run.parts.scheduler.last_epoch == 4  # not stepped for the skipped update
    assert run.parts.optimizer.state_dict()["state"] == {}  # plain SGD keeps no state


def test_fp16_skipped_update_leaves_weights_unchanged() -> None:
    spec = make_spec(precision="fp16", micro_batch_size=4, accumulation_steps=1, max_steps=2)
    run = prepare_run(spec)
    before: list[torch.Tensor] = []

    def poison_second_step(size: int, batch: Batch) -> None:
        if run.progress.step == 1:
            before.append(flat_parameters(run.parts.model).clone())
            batch.inputs.fill_(float("nan"))

    drive(run, hooks=Hooks(before_forward=poison_second_step))
    assert torch.equal(flat_parameters(run.parts.model), before[0])


def test_non_finite_loss_outside_fp16_fails_with_nan_loss() -> None:
    def poison(size: int, batch: Batch) -> None:
        batch.inputs.fill_(float("nan"))

    with pytest.raises(TrainingError) as failure:
        train(make_spec(), hooks=Hooks(before_forward=poison))
    assert failure.value.type == "nan_loss"


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_after_step_7_of_20_gives_bit_identical_weights(
    tmp_path: Any, dropout: float
) -> None:
    spec = make_spec(
        model={"type": "mlp", "hidden_sizes": [16, 16], "dropout": dropout},
        optimizer={"type": "adamw", "lr": 0.01},
        lr_schedule={"type": "cosine", "warmup_steps": 4},
        grad_clip_norm=1.0,
        max_steps=20,
        checkpoint_every=5,
    )
    uninterrupted = train(spec)
    saved: list[int] = []
    steps: list[int] = []

    def on_checkpoint(checkpoint: LiveCheckpoint) -> None:
        saved.append(checkpoint.step)
        checkpoint.write(tmp_path / f"step-{checkpoint.step}")

    first = train(
        spec,
        Callbacks(
            on_step=lambda m: steps.append(m.step),
            on_checkpoint=on_checkpoint,
            should_stop=lambda: "stopped" if steps and steps[-1] == 7 else None,
        ),
    )
    assert (first.status, first.stop_reason, first.step) == ("stopped", "stopped", 7)
    assert saved[-1] == 7
    resumed = train(spec, resume=Checkpoint.read(tmp_path / "step-7"))
    assert (resumed.status, resumed.step) == ("completed", 20)
    assert resumed.weights == uninterrupted.weights


def test_activation_checkpointing_trains_the_same_bits_and_resumes_either_way(
    tmp_path: Path,
) -> None:
    """tiny-gpt with dropout, recomputed in backward or not: the same weights; and since
    it changes no bit, a checkpoint of one resumes under the other (_TRAINING_FIELDS)."""
    text = {**TEXT, "model": {**TEXT["model"], "n_layer": 2, "dropout": 0.1}}
    spec = make_spec(**text, **OPTIMIZERS["adamw"], max_steps=6, checkpoint_every=3)
    checkpointed = spec.model_copy(update={"activation_checkpointing": True})

    def keep_step_3(saved: LiveCheckpoint) -> None:
        if saved.step == 3:
            saved.write(tmp_path)

    plain = train(spec, Callbacks(on_checkpoint=keep_step_3))
    assert train(checkpointed).weights == plain.weights
    # The dropout replayed is real: without it the same run ends elsewhere.
    without_dropout = spec.model.model_copy(update={"dropout": 0.0})
    assert train(spec.model_copy(update={"model": without_dropout})).weights != plain.weights
    resumed = train(checkpointed, resume=Checkpoint.read(tmp_path))
    assert (resumed.step, resumed.weights) == (6, plain.weights)


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path: Path) -> None:
    train(make_spec(max_steps=2), Callbacks(on_checkpoint=lambda saved: saved.write(tmp_path)))
    with pytest.raises(TrainingError) as failure:
        train(make_spec(max_steps=2, seed=1), resume=Checkpoint.read(tmp_path))
    assert failure.value.type == "incompatible_checkpoint"


def out_of_memory_above(limit: int) -> Any:
    def hook(size: int, batch: Batch) -> None:
        if size > limit:
            raise torch.OutOfMemoryError(f"injected: micro-batch {size} > {limit}")

    return hook


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_update_exact() -> None:
    spec = make_spec(
        **TEXT,
        precision="fp64",
        micro_batch_size=8,
        accumulation_steps=1,
        max_steps=6,
        optimizer={"type": "adamw", "lr": 0.01},
    )
    without = train(spec)
    events: list[tuple[str, dict[str, Any]]] = []
    metrics: list[StepMetrics] = []
    with_oom = train(
        spec,
        Callbacks(on_step=metrics.append, on_event=lambda k, d: events.append((k, d))),
        hooks=Hooks(before_forward=out_of_memory_above(2)),
    )
    backoffs = [data for kind, data in events if kind == "oom_backoff"]
    assert [(b["old_micro_batch_size"], b["new_micro_batch_size"]) for b in backoffs] == [
        (8, 4),
        (4, 2),
    ]
    assert backoffs[0]["step"] == 1 and backoffs[-1]["accumulation_steps"] == 4
    assert [m.samples_seen for m in metrics] == [8 * step for step in range(1, 7)]
    assert {m.micro_batch_size for m in metrics} == {2}
    assert_close_relative(weights_vector(with_oom.weights), weights_vector(without.weights), 1e-9)


def test_auto_micro_batch_starts_at_the_batch_size_and_backs_off() -> None:
    spec = make_spec(micro_batch_size="auto", accumulation_steps=None, batch_size=12, max_steps=3)
    metrics: list[StepMetrics] = []
    train(
        spec, Callbacks(on_step=metrics.append), hooks=Hooks(before_forward=out_of_memory_above(5))
    )
    assert [(m.micro_batch_size, m.accumulation_steps) for m in metrics] == [(3, 4)] * 3


def test_out_of_memory_at_micro_batch_one_fails_with_out_of_memory() -> None:
    with pytest.raises(TrainingError) as failure:
        train(make_spec(), hooks=Hooks(before_forward=out_of_memory_above(0)))
    assert failure.value.type == "out_of_memory"


def raise_out_of_memory(*_: Any) -> None:
    raise torch.OutOfMemoryError("injected")


def test_out_of_memory_in_backward_frees_the_graph_first_and_keeps_the_update_exact() -> None:
    """Injected inside the backward pass by a hook on the model's outputs (the graph is
    alive and half walked); whenever gradients are freed, no micro-batch's outputs may be
    alive, since the cache is emptied right after."""
    spec = make_spec(
        **CLASSIFICATION,
        precision="fp64",
        micro_batch_size=8,
        accumulation_steps=1,
        max_steps=4,
        optimizer={"type": "adamw", "lr": 0.01},
    )
    without = prepare_run(spec)
    drive(without)
    run = prepare_run(spec)
    outputs: list[weakref.ref[torch.Tensor]] = []

    def on_forward(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        outputs.append(weakref.ref(output))
        if len(inputs[0]) > 2:
            output.register_hook(raise_out_of_memory)

    run.parts.model.register_forward_hook(on_forward)
    alive_when_freed: list[int] = []
    zero_grad = run.parts.optimizer.zero_grad

    def recording_zero_grad(set_to_none: bool = True) -> None:
        alive_when_freed.append(sum(output() is not None for output in outputs))
        zero_grad(set_to_none=set_to_none)

    run.parts.optimizer.zero_grad = recording_zero_grad  # type: ignore[method-assign]
    events: list[tuple[str, dict[str, Any]]] = []
    drive(run, Callbacks(on_event=lambda kind, data: events.append((kind, data))))

    backoffs = [data for kind, data in events if kind == "oom_backoff"]
    assert [(b["old_micro_batch_size"], b["new_micro_batch_size"]) for b in backoffs] == [
        (8, 4),
        (4, 2),
    ]
    # Two backoffs, then one zero_grad per step: none while a graph was alive.
    assert alive_when_freed == [0] * 6
    assert_close_relative(
        flat_parameters(run.parts.model), flat_parameters(without.parts.model), 1e-9
    )


def test_out_of_memory_in_the_optimizer_step_fails_saying_the_state_does_not_fit() -> None:
    run = prepare_run(make_spec(optimizer={"type": "adamw", "lr": 0.01}))
    run.parts.optimizer.register_step_pre_hook(raise_out_of_memory)
    events: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(TrainingError) as failure:
        drive(run, Callbacks(on_event=lambda kind, data: events.append((kind, data))))
    assert failure.value.type == "out_of_memory"
    message = failure.value.message
    assert "optimizer state does not fit" in message and "AdamW keeps 2 values" in message
    assert "Micro-batching cannot help" in message
    # Not mistaken for activations: the micro-batch was not halved to no avail.
    assert [kind for kind, _ in events if kind == "oom_backoff"] == []
    assert all(p.grad is None for p in run.parts.model.parameters())


def out_of_memory_in_evaluation_above(limit: int) -> Any:
    def on_forward(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        if not module.training and len(inputs[0]) > limit:
            raise torch.OutOfMemoryError(f"injected: evaluation batch {len(inputs[0])}")

    return on_forward


@pytest.mark.parametrize("task", ["classification", "text"])
def test_out_of_memory_in_evaluation_halves_its_batch_and_gives_the_same_result(
    task: str,
) -> None:
    spec = make_spec(
        **(CLASSIFICATION if task == "classification" else TEXT),
        precision="fp64",
        micro_batch_size=8,
        accumulation_steps=1,
        max_steps=4,
        eval_every=2,
    )
    expected: list[StepMetrics] = []
    train(spec, Callbacks(on_step=expected.append))
    run = prepare_run(spec)
    run.parts.model.register_forward_hook(out_of_memory_in_evaluation_above(2))
    metrics: list[StepMetrics] = []
    events: list[tuple[str, dict[str, Any]]] = []
    drive(run, Callbacks(on_step=metrics.append, on_event=lambda k, d: events.append((k, d))))

    warnings = [data for kind, data in events if kind == "warning"]
    assert [(w["step"], w["old_evaluation_batch_size"]) for w in warnings] == [(2, 8), (2, 4)]
    assert "evaluating in batches of 2" in warnings[-1]["message"]
    # Training itself never shrank, and the evaluations are those of the full batch.
    assert {m.micro_batch_size for m in metrics} == {8}
    evaluated = [(m.step, m.eval_loss, m.eval_accuracy) for m in metrics if m.eval_loss]
    assert [step for step, _, _ in evaluated] == [2, 4]
    for (_, loss, accuracy), reference in zip(evaluated, expected[1::2], strict=True):
        assert loss == pytest.approx(reference.eval_loss, rel=1e-12)
        assert accuracy == reference.eval_accuracy
    assert run.parts.model.training


def test_out_of_memory_in_evaluation_of_one_sample_fails_with_out_of_memory() -> None:
    run = prepare_run(make_spec(eval_every=1))
    run.parts.model.register_forward_hook(out_of_memory_in_evaluation_above(0))
    with pytest.raises(TrainingError) as failure:
        drive(run)
    assert failure.value.type == "out_of_memory" and "evaluation" in failure.value.message


def test_batchnorm_model_is_refused_when_accumulating() -> None:
    from worker.engine.trainer import check_accumulation_is_exact

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(TrainingError) as failure:
        check_accumulation_is_exact(model, make_spec(accumulation_steps=2))
    assert failure.value.type == "inexact_accumulation" and "1" in failure.value.message
    check_accumulation_is_exact(model, make_spec(accumulation_steps=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_clear_error_at_start() -> None:
    with pytest.raises(TrainingError) as failure:
        train(make_spec(device="cuda"))
    assert failure.value.type == "invalid_device" and "CUDA" in failure.value.message


LEARNING = {
    "mlp-digits": ({"type": "mlp", "hidden_sizes": [64]}, {"type": "digits"}, 0.01),
    "cnn-digits": ({"type": "cnn", "channels": [8, 16]}, {"type": "digits"}, 0.005),
    "mlp-synthetic": (
        {"type": "mlp"},
        {"type": "synthetic-classification", "n_samples": 1024},
        0.01,
    ),
    "tiny-gpt-text": (
        {"type": "tiny-gpt", "n_layer": 2, "n_embd": 64},
        {"type": "tiny-text"},
        0.003,
    ),
}


@pytest.mark.parametrize("name", sorted(LEARNING))
def test_built_in_model_learns_its_built_in_dataset(name: str) -> None:
    model, dataset, lr = LEARNING[name]
    spec = make_spec(
        model=model,
        dataset=dataset,
        micro_batch_size=16,
        accumulation_steps=2,
        max_steps=60,
        eval_every=60,
        optimizer={"type": "adamw", "lr": lr},
    )
    run = prepare_run(spec)
    assert run.data.eval is not None
    from worker.engine.trainer import evaluate

    loss_before, accuracy_before = evaluate(run, run.data.eval)
    metrics: list[StepMetrics] = []
    drive(run, Callbacks(on_step=metrics.append))
    final = metrics[-1]
    assert final.eval_loss is not None and final.eval_accuracy is not None
    assert final.eval_loss < 0.65 * loss_before
    assert final.eval_accuracy > accuracy_before + 0.2


def test_bf16_autocast_trains_close_to_fp32() -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        metrics: list[StepMetrics] = []
        spec = make_spec(precision=precision, max_steps=20, optimizer={"type": "adamw", "lr": 0.01})
        train(spec, Callbacks(on_step=metrics.append))
        losses[precision] = metrics[-1].loss
        assert all(not m.skipped for m in metrics)
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]


def test_the_engine_imports_no_settings_database_or_celery() -> None:
    # The caller passes what the operator configured (e.g. HfLimits): the loop reads none.
    code = (
        "import importlib, pkgutil, sys, worker.engine\n"
        "for module in pkgutil.iter_modules(worker.engine.__path__):\n"
        "    importlib.import_module('worker.engine.' + module.name)\n"
        "import worker.datafiles.load\n"
        "print(sorted(name for name in ('app.settings', 'app.db', 'sqlalchemy', 'celery', "
        "'redis') if name in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
