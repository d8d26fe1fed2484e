"""The training loop: windows in order, metrics per step, evaluation and checkpoints.

`train(spec, callbacks)` is all a caller needs. It reports through callbacks and
never talks to a database or a queue itself, so the Celery task and `trainjob run`
drive the same loop.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch.nn.modules.batchnorm import _BatchNorm

from app.jobs.spec import Device, JobSpec
from worker.datafiles.load import FileSource
from worker.engine.batching import DataPosition, Window, WindowPlanner
from worker.engine.checkpoint import (
    Checkpoint,
    LiveCheckpoint,
    capture_rng,
    load_weights,
    restore_rng,
    unpack_state,
    weights_to_bytes,
    write_safetensors,
)
from worker.engine.data_types import IGNORE_INDEX, DataSplits, SampleSet
from worker.engine.determinism import use_deterministic_algorithms
from worker.engine.distributed import RankGroup, broadcast_parameters, run_window_on_ranks
from worker.engine.errors import TrainingError
from worker.engine.hf import DEFAULT_LIMITS, HfLimits
from worker.engine.hooks import NO_HOOKS, Hooks
from worker.engine.lora import (
    adapter_config,
    adapter_metadata,
    adapter_tensors,
    apply_lora,
    load_adapter,
    merged_weights,
    peft_model,
    trainable_parameters,
)
from worker.engine.optim import build_optimizer, build_scheduler
from worker.engine.precision import plan_precision
from worker.engine.quantize import check_cuda_options, plan_quantization
from worker.engine.registry import build_dataset, build_model, model_name, model_tokenizer
from worker.engine.window import (
    MicroBatchOutOfMemory,
    StepParts,
    WindowOutcome,
    accumulate_gradients,
    apply_update,
    forward,
    release_cached_memory,
    sum_loss,
)

# Spec fields that change what is trained; a checkpoint resumes only the same training.
# Not how a window is cut (micro_batch_size, accumulation_steps, devices): accumulation
# is exact, so a run may resume on another number of devices with the same batch. Nor
# activation_checkpointing: it changes what a step keeps in memory, not one bit of what
# it computes (recomputation replays the same operations and the same RNG; pinned by
# tests/test_activation_checkpointing_end_to_end.py), so either may resume the other's run.
_TRAINING_FIELDS = {
    "model",
    "dataset",
    "batch_size",
    "max_steps",
    "epochs",
    "optimizer",
    "lora",
    "lr_schedule",
    "grad_clip_norm",
    "precision",
    "quantize",
    "seed",
}


@dataclass(frozen=True)
class StepMetrics:
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    samples_seen: int
    tokens_seen: int
    samples_per_sec: float
    # Wall time of the step's window (forward, backward, optimizer), without evaluation.
    step_seconds: float
    # The split in use, m × k of a full window (after any out-of-memory backoff); an
    # epoch's short last window is cut into fewer micro-batches, but that is no new split.
    micro_batch_size: int
    accumulation_steps: int
    # Samples in this step's window: below the batch size for an epoch's last window.
    window_samples: int
    skipped: bool
    time: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        # Every field is a number, a bool or None, so this equals dataclasses.asdict,
        # which deep-copies field by field: a measurable cost per step for small models.
        return {name: getattr(self, name) for name in _STEP_METRICS_FIELDS}


_STEP_METRICS_FIELDS = tuple(item.name for item in fields(StepMetrics))


@dataclass
class Callbacks:
    """How the loop reports. Every callback runs at a window boundary, never inside one."""

    # Called once before the first window with (steps already done, total steps).
    on_start: Callable[[int, int], None] = lambda *_: None
    on_step: Callable[[StepMetrics], None] = lambda *_: None
    # Event types: oom_backoff, overflow_skip, warning, checkpoint.
    on_event: Callable[[str, dict[str, Any]], None] = lambda *_: None
    # Writes the checkpoint's parts where they are kept: they can be written only then.
    on_checkpoint: Callable[[LiveCheckpoint], None] = lambda *_: None
    # Asked before each window; a reason (e.g. "cancelled") stops the run after a checkpoint.
    should_stop: Callable[[], str | None] = lambda: None


@dataclass
class Progress:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    micro_batch_size: int = 1
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_updates: int = 0
    # Of the last evaluation at or before `step`; kept in checkpoints, so that the next
    # checkpoint of a resumed run still knows it.
    eval_loss: float | None = None


# Saved in a checkpoint's state under their own names (the position as epoch and index).
_PROGRESS_COUNTERS = ("step", "micro_batch_size", "samples_seen", "tokens_seen", "skipped_updates")


@dataclass(frozen=True)
class TrainResult:
    status: Literal["completed", "stopped"]
    stop_reason: str | None
    step: int
    total_steps: int
    last_metrics: StepMetrics | None
    model: torch.nn.Module = field(repr=False)

    @property
    def weights(self) -> bytes:
        """The trained weights as safetensors bytes, made on each ask: the service never
        asks (its last checkpoint has them), and a run holds no copy of them meanwhile.
        A LoRA job's are the merged weights, named as the model's own."""
        metadata = {"step": str(self.step)}
        adapted = peft_model(self.model)
        if adapted is None:
            return weights_to_bytes(self.model, metadata)
        merged = merged_weights(adapted)
        buffer = io.BytesIO()
        write_safetensors(merged.tensors, metadata, buffer, merged.materialize)
        return buffer.getvalue()

    @property
    def adapter(self) -> tuple[bytes, dict[str, Any]] | None:
        """A LoRA job's adapter as peft saves it: the bytes of adapter_model.safetensors and
        the content of adapter_config.json; None for a job without LoRA."""
        adapted = peft_model(self.model)
        if adapted is None:
            return None
        buffer = io.BytesIO()
        metadata = {"step": str(self.step), **adapter_metadata(adapted)}
        write_safetensors(adapter_tensors(adapted), metadata, buffer)
        return buffer.getvalue(), adapter_config(adapted)


@dataclass
class Run:
    """Everything one run holds between windows."""

    spec: JobSpec
    data: DataSplits
    parts: StepParts
    planner: WindowPlanner
    total_steps: int
    progress: Progress
    # Samples per evaluation batch once an evaluation ran out of memory; until then the
    # micro-batch size. Not checkpointed: a resumed run finds it again.
    evaluation_batch_size: int | None = None
    # The process group this run is one rank of; None on one device.
    group: RankGroup | None = None

    @property
    def world_size(self) -> int:
        return self.group.world_size if self.group is not None else 1

    def accumulation_steps(self) -> int:
        """Micro-batches per rank of a full window, at the micro-batch size in use."""
        return math.ceil(self.spec.window_size / (self.progress.micro_batch_size * self.world_size))


def resolve_device(requested: Device) -> torch.device:
    """The run's device; asking for CUDA where there is none fails at start."""
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise TrainingError(
            "invalid_device",
            "device 'cuda' was requested but CUDA is not available on this machine; "
            "use device 'auto' or 'cpu'",
        )
    return torch.device("cuda" if requested != "cpu" and available else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_accumulation_is_exact(model: torch.nn.Module, spec: JobSpec) -> None:
    """BatchNorm normalises by micro-batch statistics: splitting a batch changes the update.

    We refuse rather than warn: a run that silently trains something other than what the
    spec says is worse than no run. With one micro-batch per window it is exact.
    """
    splits = spec.micro_batch_size == "auto" or (spec.accumulation_steps or 1) > 1
    layers = [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    if splits and layers:
        raise TrainingError(
            "inexact_accumulation",
            f"layers {', '.join(layers)} normalise over the micro-batch (BatchNorm), so "
            "accumulating gradients over several micro-batches would not equal the full-batch "
            "update; use accumulation_steps 1, or a per-sample normalisation "
            "(LayerNorm, GroupNorm)",
        )


def prepare_run(
    spec: JobSpec,
    files: FileSource | None = None,
    hf_limits: HfLimits = DEFAULT_LIMITS,
    group: RankGroup | None = None,
    deterministic: bool = False,
) -> Run:
    """Build data, model, optimizer, schedule and scaler from the spec, seeded.

    `files` brings an uploaded file's bytes to a local path: only the service has them.
    `hf_limits` says where Hugging Face models may come from and how large they may be
    (the operator's settings). `group`: the run is one rank of it (worker/engine/distributed.py).
    `deterministic`: deterministic kernels for this process (worker/engine/determinism.py),
    turned on before anything touches the device.
    """
    if deterministic:
        use_deterministic_algorithms()
    device = resolve_device(spec.device)
    # quantize and adamw8bit: refused off CUDA before any data is read or model built.
    check_cuda_options(spec, device)
    precision = plan_precision(spec.precision, device)
    seed_everything(spec.seed)
    tokenizer = model_tokenizer(spec, hf_limits)
    data = build_dataset(spec.dataset, spec.seed, files, tokenizer, model_name(spec.model))
    if len(data.train) == 0:
        raise TrainingError("invalid_data", "the training split is empty")
    quantization = plan_quantization(spec, precision)
    model = build_model(
        spec.model, data.info, hf_limits, quantization, spec.activation_checkpointing
    )
    if spec.lora is not None:
        # After the base, from the same seeded stream: a resumed run draws the same adapters.
        model = apply_lora(model, spec.lora, spec.model)
    if quantization is None:
        # A quantized base is on its device already and keeps its 4/8-bit weights: a cast
        # would undo the quantization (transformers refuses it).
        model.to(device=device, dtype=precision.parameter_dtype)
    model.train()
    if group is not None:
        broadcast_parameters(model)
    check_accumulation_is_exact(model, spec)
    # Frozen weights (LoRA) get no optimizer state.
    optimizer = build_optimizer(spec.optimizer, trainable_parameters(model))
    total_steps = spec.max_steps
    if total_steps is None:
        assert spec.epochs is not None  # the spec gives exactly one of the two
        # An epoch's last partial window is a step of its own: never dropped.
        total_steps = spec.epochs * math.ceil(len(data.train) / spec.window_size)
    scheduler = build_scheduler(spec.lr_schedule, optimizer, total_steps)
    parts = StepParts(
        model, optimizer, scheduler, precision.grad_scaler(), precision, spec.grad_clip_norm
    )
    # 'auto' starts with each rank's whole share of the window in one micro-batch.
    world_size = group.world_size if group is not None else 1
    auto = spec.micro_batch_size == "auto"
    micro = math.ceil(spec.window_size / world_size) if auto else spec.micro_batch_size
    assert isinstance(micro, int)
    planner = WindowPlanner(len(data.train), spec.window_size, spec.seed)
    progress = Progress(micro_batch_size=micro)
    return Run(spec, data, parts, planner, total_steps, progress, group=group)


def _training_fields(spec: JobSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", include=_TRAINING_FIELDS)


def make_checkpoint(run: Run, loss: float | None) -> LiveCheckpoint:
    progress, parts = run.progress, run.parts
    state = {
        **{name: getattr(progress, name) for name in _PROGRESS_COUNTERS},
        "epoch": progress.position.epoch,
        "index": progress.position.index,
        "eval_loss": progress.eval_loss,
        "training": _training_fields(run.spec),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": capture_rng(),
    }
    adapted = peft_model(parts.model)
    if adapted is None:
        # The live tensors, not copies: they are serialised before the run moves on.
        return LiveCheckpoint(
            step=progress.step,
            weights=dict(parts.model.state_dict()),
            state=state,
            loss=loss,
            eval_loss=progress.eval_loss,
        )
    # A LoRA job's checkpoint holds what trains, its adapter: the base is rebuilt from the
    # spec. Its final one also has the merged weights, for those who serve the model whole.
    final = progress.step >= run.total_steps
    return LiveCheckpoint(
        step=progress.step,
        weights=adapter_tensors(adapted),
        state=state,
        loss=loss,
        eval_loss=progress.eval_loss,
        merged=merged_weights(adapted) if final else None,
        weights_metadata=adapter_metadata(adapted),
    )


def restore_checkpoint(run: Run, checkpoint: Checkpoint) -> None:
    state = unpack_state(checkpoint.state)
    # Older checkpoints also hold the fields of the cut: they are not compared.
    written_for = {name: state["training"].get(name) for name in _TRAINING_FIELDS}
    dataset = written_for["dataset"]
    if isinstance(dataset, dict) and dataset.get("type") == "file":
        # Written before dataset.packing existed: those runs trained unpacked.
        written_for["dataset"] = {"packing": False, **dataset}
    if written_for != _training_fields(run.spec):
        raise TrainingError(
            "incompatible_checkpoint", "the checkpoint was written by a different training spec"
        )
    parts = run.parts
    adapted = peft_model(parts.model)
    if adapted is None:
        load_weights(parts.model, checkpoint.weights)
    else:
        load_adapter(adapted, load_safetensors(checkpoint.weights))
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    # An out-of-memory backoff before the checkpoint stays; so does a micro-batch made
    # smaller since (a resume on more devices, a smaller micro_batch_size).
    micro_batch_size = min(state["micro_batch_size"], run.progress.micro_batch_size)
    run.progress = Progress(
        **{name: state[name] for name in _PROGRESS_COUNTERS},
        position=DataPosition(epoch=state["epoch"], index=state["index"]),
        # Absent from checkpoints written before evaluations were remembered.
        eval_loss=state.get("eval_loss"),
    )
    run.progress.micro_batch_size = micro_batch_size


def run_window_with_backoff(
    run: Run,
    window: Window,
    on_event: Callable[[str, dict[str, Any]], None],
    hooks: Hooks = NO_HOOKS,
) -> WindowOutcome:
    """Run a window; on out-of-memory halve the micro-batch and redo the same samples.

    The window, and so the effective batch and its normaliser, stays the same: only
    how it is cut changes, and the count-based normalisation makes uneven cuts exact.
    """
    progress = run.progress
    while True:
        try:
            if run.group is not None:
                run.group.seed_window(run.spec.seed, progress.step)
                return run_window_on_ranks(
                    run.parts,
                    run.data.train,
                    window.indices,
                    progress.micro_batch_size,
                    run.group,
                    hooks,
                )
            micro_batches = window.micro_batches(progress.micro_batch_size)
            loss_sum, units = accumulate_gradients(run.parts, run.data.train, micro_batches, hooks)
            return apply_update(run.parts, loss_sum, units, hooks)
        except MicroBatchOutOfMemory:
            # A rank's share is the most one micro-batch can hold.
            in_use = min(progress.micro_batch_size, math.ceil(len(window.indices) / run.world_size))
            if in_use == 1:
                raise TrainingError(
                    "out_of_memory", "out of memory with a micro-batch of 1 sample"
                ) from None
            progress.micro_batch_size = in_use // 2
            on_event(
                "oom_backoff",
                {
                    "step": progress.step + 1,
                    "old_micro_batch_size": in_use,
                    "new_micro_batch_size": progress.micro_batch_size,
                    "accumulation_steps": run.accumulation_steps(),
                },
            )


def evaluate(
    run: Run,
    data: SampleSet,
    on_event: Callable[[str, dict[str, Any]], None] = lambda *_: None,
    hooks: Hooks = NO_HOOKS,
) -> tuple[float, float | None]:
    """Loss per unit and accuracy per unit on a held-out split. Regression (float
    targets): the mean squared error per sample, and no accuracy.

    On out-of-memory the evaluation batch is halved and the split evaluated again: both
    are sums over every unit divided by their count, so the batch does not change them.
    """
    while True:
        size = max(1, min(run.progress.micro_batch_size, run.evaluation_batch_size or len(data)))
        evaluated = _evaluate_in_batches(run, data, size, hooks)
        if evaluated is not None:
            return evaluated
        if size == 1:
            raise TrainingError(
                "out_of_memory", "evaluation ran out of memory with a batch of 1 sample"
            )
        run.evaluation_batch_size = size // 2
        on_event(
            "warning",
            {
                "step": run.progress.step,
                "message": f"evaluation ran out of memory with batches of {size} samples: "
                f"evaluating in batches of {size // 2} (the result does not depend on it)",
                "old_evaluation_batch_size": size,
                "new_evaluation_batch_size": size // 2,
            },
        )


@torch.no_grad()
def _evaluate_in_batches(
    run: Run, data: SampleSet, size: int, hooks: Hooks
) -> tuple[float, float | None] | None:
    """As `evaluate`, in batches of `size`; None after an out-of-memory error."""
    model, precision = run.parts.model, run.parts.precision
    loss_sum = torch.zeros((), dtype=torch.float64, device=precision.device)
    correct = torch.zeros((), dtype=torch.int64, device=precision.device)
    units = 0
    regression = False
    out_of_memory = False
    model.eval()
    try:
        for start in range(0, len(data), size):
            indices = list(range(start, min(start + size, len(data))))
            batch_loss, batch_correct, regression = _evaluation_batch(run, data, indices, hooks)
            loss_sum += batch_loss
            correct += batch_correct
            units += data.loss_units(indices)
    except torch.OutOfMemoryError:
        # Handled after the except block, whose traceback holds the batch's outputs.
        out_of_memory = True
    finally:
        model.train()
    if out_of_memory:
        release_cached_memory(precision.device)
        return None
    return loss_sum.item() / units, None if regression else correct.item() / units


def _evaluation_batch(
    run: Run, data: SampleSet, indices: list[int], hooks: Hooks
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(loss sum, correct predictions, regression?) of one batch, on the device."""
    model, precision = run.parts.model, run.parts.precision
    batch = data.collate(indices).to(precision.device, precision.parameter_dtype)
    if hooks.before_evaluation is not None:
        hooks.before_evaluation(len(indices), batch)
    with precision.autocast():
        outputs = forward(model, batch)
    outputs = outputs.to(precision.parameter_dtype)
    loss = sum_loss(outputs, batch.targets)
    if batch.targets.is_floating_point():
        return loss, torch.zeros((), dtype=torch.int64, device=precision.device), True
    correct = ((outputs.argmax(dim=-1) == batch.targets) & (batch.targets != IGNORE_INDEX)).sum()
    return loss, correct, False


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train(
    spec: JobSpec,
    callbacks: Callbacks | None = None,
    resume: Checkpoint | None = None,
    hooks: Hooks = NO_HOOKS,
    files: FileSource | None = None,
    hf_limits: HfLimits = DEFAULT_LIMITS,
    group: RankGroup | None = None,
    deterministic: bool = False,
) -> TrainResult:
    """Train `spec` to its end, or until `callbacks.should_stop` gives a reason."""
    run = prepare_run(spec, files, hf_limits, group, deterministic)
    if resume is not None:
        restore_checkpoint(run, resume)
    return drive(run, callbacks, hooks)


def drive(run: Run, callbacks: Callbacks | None = None, hooks: Hooks = NO_HOOKS) -> TrainResult:
    callbacks = callbacks or Callbacks()
    progress, spec = run.progress, run.spec
    last_checkpoint_step = progress.step if progress.step > 0 else -1
    metrics: StepMetrics | None = None

    def checkpoint() -> None:
        nonlocal last_checkpoint_step
        if progress.step == last_checkpoint_step:
            return
        saved = make_checkpoint(run, metrics.loss if metrics else None)
        try:
            callbacks.on_checkpoint(saved)
        finally:
            saved.release()  # the next window changes these tensors
        callbacks.on_event("checkpoint", {"step": saved.step, "size_bytes": saved.size_bytes})
        last_checkpoint_step = progress.step

    def result(status: Literal["completed", "stopped"], reason: str | None) -> TrainResult:
        return TrainResult(status, reason, progress.step, run.total_steps, metrics, run.parts.model)

    callbacks.on_start(progress.step, run.total_steps)
    while progress.step < run.total_steps:
        stop_reason = callbacks.should_stop()
        if run.group is not None:
            stop_reason = run.group.agree(stop_reason)
        if stop_reason is not None:
            checkpoint()
            return result("stopped", stop_reason)
        window = run.planner.window_at(progress.position)
        lr = run.parts.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        outcome = run_window_with_backoff(run, window, callbacks.on_event, hooks)
        elapsed = time.perf_counter() - started

        progress.step += 1
        progress.position = run.planner.advance(progress.position, window)
        progress.samples_seen += len(window.indices)
        progress.tokens_seen += run.data.train.tokens(window.indices)
        if outcome.skipped:
            progress.skipped_updates += 1
            callbacks.on_event("overflow_skip", {"step": progress.step, "scale": outcome.scale})
        eval_loss = eval_accuracy = None
        if run.data.eval is not None and _due(progress.step, spec.eval_every):
            eval_loss, eval_accuracy = evaluate(run, run.data.eval, callbacks.on_event, hooks)
            # Before this step's checkpoint below, which remembers it.
            progress.eval_loss = eval_loss
        metrics = StepMetrics(
            step=progress.step,
            epoch=window.epoch,
            loss=outcome.loss,
            lr=lr,
            grad_norm=outcome.grad_norm,
            samples_seen=progress.samples_seen,
            tokens_seen=progress.tokens_seen,
            samples_per_sec=len(window.indices) / elapsed if elapsed > 0 else 0.0,
            step_seconds=elapsed,
            micro_batch_size=progress.micro_batch_size,
            accumulation_steps=run.accumulation_steps(),
            window_samples=len(window.indices),
            skipped=outcome.skipped,
            time=time.time(),
            eval_loss=eval_loss,
            eval_accuracy=eval_accuracy,
        )
        callbacks.on_step(metrics)
        if _due(progress.step, spec.checkpoint_every):
            checkpoint()
    checkpoint()
    return result("completed", None)
