"""Training throughput: the engine as the worker runs it, against a hand-written PyTorch
loop, accelerate and Lightning, on the same model, data, seed and (m, k).

Not part of CI (a smoke run is: `--smoke`, tests/bench/test_loop_smoke.py). For each
model size and each k the four variants start from one model built by the engine's
registry (deep-copied per variant) and train on the same sequence of micro-batches:
the engine's window order for the seed, each micro-batch collated by the data set.

- engine: `worker.engine.trainer.drive` with the callbacks the worker gives it, backed
  by an in-memory stand-in for worker/progress_writer.py's ProgressWriter: the
  metrics dict of every step (`finite_or_none(metrics.to_dict())`), metrics and events
  batched and flushed every `--flush-seconds` (the "write" JSON-encodes them, as the
  live publisher does), and a checkpoint (weights and optimizer state serialised by
  the engine) every `--checkpoint-every` steps and at the end. No database.
- hand: plain PyTorch. Each micro-batch's loss summed over its tokens and divided by
  the window's token count (the engine's normaliser), backward; one optimizer step
  and zero_grad per window.
- accelerate: `Accelerator(gradient_accumulation_steps=k)`, model, optimizer and
  DataLoader prepared, `with accelerator.accumulate(model)`, mean loss per
  micro-batch, `accelerator.backward` (which divides by k).
- lightning: `Trainer(accumulate_grad_batches=k, accelerator="cpu", devices=1, ...)`,
  the mean loss per micro-batch returned by training_step (Lightning divides by k).

On CUDA (`--device cuda`) every variant trains on the GPU, and `--precision bf16`
trains each in bf16 autocast with fp32 weights: the engine by its spec's precision, the
hand loop in `torch.autocast`, accelerate with `mixed_precision="bf16"`, Lightning with
`accelerator="gpu", precision="bf16-mixed"`; the loss is taken from fp32 logits in all
four. Clocks synchronise the GPU before they read the time. `--m` gives the
micro-batch sizes, `--layers/--width/--heads/--sequence` change the model's shape: a
model whose sequence is not tiny-text's 64 tokens trains on rows of the corpus as an
uploaded text file (bench/common.py's write_text_rows, 512 rows, byte-level).
`--json PATH` writes every point's figures for bench/gpu.py.

Every sequence has the same length, so a micro-batch's mean loss over k equals the
engine's sum over the window's tokens: all four must end at the same weights
(max |w - w_hand| / max |w_hand| below 1e-4 in every round, else the exit status is 1;
in bf16 below 5e-2: the same sums rounded in another order, and AdamW turns a small
gradient's rounding into a whole step of lr).
Timed: the engine's `drive` call (every window, metrics, checkpoints, the final
weights), the hand and accelerate loops, and Lightning from on_train_start to
on_train_end; building models, optimizers, Accelerator and Trainer is not. Variants
run interleaved, in a rotated order each round, `--rounds` times after a short
warm-up. The first table gives each variant's median samples/s (wall clock), the
second the median of its per-round ratio to the hand loop of the same round, by wall
clock and by this process's CPU seconds (on a shared machine the CPU ratio is the
steadier one: time spent descheduled does not count), and what one engine checkpoint
costs. Targets (issue 7): the engine at >= 0.97x the hand loop at every point, and
ahead of accelerate and Lightning; a missed target is printed, not an error.
`--threads` torch threads (default 1).

    .venv/bin/python bench/loop.py               # the full grid, about 6 minutes
    .venv/bin/python bench/loop.py --smoke       # a tiny model, k 1 and 4, one round
    .venv/bin/python bench/loop.py --device cuda --precision bf16 --sizes gpu \
        --m 4 16 --k 1 8 --rounds 2              # what bench/gpu.py runs on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import format_table, local_files, machine_lines, text_file_dataset, write_text_rows
from torch import nn
from torch.utils.data import DataLoader, Dataset

from app.jobs.spec import JobSpec
from worker.datafiles.load import FileSource
from worker.engine.batching import DataPosition, WindowPlanner
from worker.engine.checkpoint import LiveCheckpoint
from worker.engine.data_types import IGNORE_INDEX, SampleSet
from worker.engine.optim import build_optimizer, build_scheduler
from worker.engine.registry import build_dataset, build_model
from worker.engine.trainer import (
    Callbacks,
    StepMetrics,
    drive,
    make_checkpoint,
    prepare_run,
    seed_everything,
)
from worker.engine.window import StepParts
from worker.progress_writer import finite_or_none

VARIANTS = ("hand", "engine", "accelerate", "lightning")
ENGINE_TARGET = 0.97
WEIGHT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}

# tiny-gpt as in the README's walkthrough (small) and twice as deep and wide (large).
MODELS: dict[str, dict[str, Any]] = {
    "small": {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "large": {"type": "tiny-gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    "smoke": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64},
    # A size that keeps a GPU busy (issue 15): GPT-2 small's body, 85 M parameters.
    "gpu": {"type": "tiny-gpt", "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 512},
}
# Micro-batches per timed run (a multiple of every k), about a second each here (gpu: an
# estimated second on an H100 at m=16, 6 · 85 M · 64·16·512 FLOPs at 40 % of its peak).
MICRO_BATCHES = {"small": 192, "large": 96, "smoke": 8, "gpu": 64}
TINY_TEXT_SEQUENCE = 64
# Rows of the text file a model of another sequence length trains on: windows of m·k
# up to 512 samples tile an epoch.
TEXT_ROWS = 512
# The shipped corpus cut into 113 sequences of 65 characters (64 input tokens each); an
# eval split of 49 leaves 64 to train on, so windows of m·k = 4, 16, 64 tile every epoch
# and every micro-batch holds the same number of tokens.
DATASET: dict[str, Any] = {
    "type": "tiny-text",
    "min_length": 65,
    "max_length": 65,
    "eval_fraction": 0.434,
}
OPTIMIZER: dict[str, Any] = {"type": "adamw", "lr": 0.003}
SEED = 0


class Stopwatch:
    """Wall-clock and CPU seconds of this process (all its threads) between start and stop.
    On CUDA it waits for the GPU first: kernels are queued, not done, when a call returns."""

    def __init__(self, device: torch.device) -> None:
        self.wall = self.cpu = 0.0
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()

    def stop(self) -> Stopwatch:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall += time.perf_counter()
        self.cpu += time.process_time()
        return self


Trained = tuple[Stopwatch, nn.Module]


@dataclass(frozen=True)
class Case:
    """One grid point: a spec, its data, the shared initial model and its windows."""

    size: str
    spec: JobSpec
    data: SampleSet
    initial: nn.Module
    windows: list[list[list[int]]]  # per optimizer step, its micro-batches' indices
    threads: int
    files: FileSource | None  # the text file a model of another sequence length reads

    @property
    def micro_batch_size(self) -> int:
        return len(self.windows[0][0])

    @property
    def accumulation_steps(self) -> int:
        return len(self.windows[0])

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    @property
    def bf16(self) -> bool:
        return self.spec.precision == "bf16"

    @property
    def samples(self) -> int:
        return sum(len(indices) for window in self.windows for indices in window)

    @property
    def tokens(self) -> int:
        """The model inputs of a timed run: samples × sequence length for text."""
        return sum(self.data.tokens(indices) for window in self.windows for indices in window)

    def shortened(self, steps: int) -> Case:
        spec = self.spec.model_copy(update={"max_steps": steps})
        return dataclasses.replace(self, spec=spec, windows=self.windows[:steps])


def model_of(size: str, args: Any) -> dict[str, Any]:
    """The size's tiny-gpt, with the shape options applied."""
    shape = {
        "n_layer": args.layers,
        "n_head": args.heads,
        "n_embd": args.width,
        "block_size": args.sequence,
    }
    return MODELS[size] | {name: value for name, value in shape.items() if value is not None}


def make_spec(
    model: dict[str, Any],
    dataset: dict[str, Any],
    micro_batch_size: int,
    accumulation_steps: int,
    steps: int,
    args: Any,
) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": model,
            "dataset": dataset,
            "micro_batch_size": micro_batch_size,
            "accumulation_steps": accumulation_steps,
            "max_steps": steps,
            "optimizer": OPTIMIZER,
            "checkpoint_every": args.checkpoint_every,
            "seed": SEED,
            "device": args.device,
            "precision": args.precision,
        }
    )


def make_case(
    size: str,
    micro_batch_size: int,
    accumulation_steps: int,
    micro_batches: int,
    args: Any,
    text_file: Path,
) -> Case:
    steps = micro_batches // accumulation_steps
    model = model_of(size, args)
    sequence = model["block_size"]
    files = None if sequence == TINY_TEXT_SEQUENCE else local_files(text_file)
    dataset = DATASET if files is None else text_file_dataset(sequence + 1)
    spec = make_spec(model, dataset, micro_batch_size, accumulation_steps, steps, args)
    seed_everything(spec.seed)
    data = build_dataset(spec.dataset, spec.seed, files)
    initial = build_model(spec.model, data.info)
    planner = WindowPlanner(len(data.train), spec.window_size, spec.seed)
    position, windows = DataPosition(), []
    for _ in range(steps):
        window = planner.window_at(position)
        if len(window.indices) != spec.window_size:
            raise SystemExit(f"a window of {len(window.indices)} samples: the data must tile")
        windows.append(window.micro_batches(micro_batch_size))
        position = planner.advance(position, window)
    return Case(size, spec, data.train, initial, windows, args.threads, files)


# ---------------------------------------------------------------- the engine


class InMemoryProgress:
    """worker/progress_writer.py's ProgressWriter, with lists where the database was."""

    def __init__(self, flush_seconds: float) -> None:
        self.flush_seconds = flush_seconds
        self.pending_metrics: list[dict[str, Any]] = []
        self.pending_events: list[tuple[str, dict[str, Any]]] = []
        self.job_values: dict[str, Any] = {}
        self.last_flush = time.monotonic()
        self.written_metrics = 0
        self.written_bytes = 0
        self.checkpoints: list[int] = []

    def on_start(self, done_steps: int, total_steps: int) -> None:
        self.job_values["max_steps"] = total_steps
        self.flush()

    def on_step(self, metrics: StepMetrics) -> None:
        values = finite_or_none(metrics.to_dict())
        self.pending_metrics.append(values)
        self.job_values.update(
            step=metrics.step,
            epoch=metrics.epoch,
            samples_seen=metrics.samples_seen,
            tokens_seen=metrics.tokens_seen,
            micro_batch_size=metrics.micro_batch_size,
            accumulation_steps=metrics.accumulation_steps,
            metrics=values,
        )
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind != "checkpoint":
            self.pending_events.append((kind, finite_or_none(data)))

    def on_checkpoint(self, checkpoint: LiveCheckpoint) -> None:
        self.flush()
        # The worker serialises both parts into the checkpoint store; here into nothing.
        checkpoint.write_weights(_Discard())
        checkpoint.write_state(_Discard())
        self.checkpoints.append(checkpoint.step)

    def should_stop(self) -> str | None:
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()
        return None

    def flush(self) -> None:
        metrics, events = self.pending_metrics, self.pending_events
        self.pending_metrics, self.pending_events = [], []
        live = [{"type": "metrics", "data": metric} for metric in metrics]
        live += [{"type": kind, "data": data} for kind, data in events]
        self.written_bytes += sum(len(json.dumps(message, default=str)) for message in live)
        self.written_metrics += len(metrics)
        self.last_flush = time.monotonic()

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_start=self.on_start,
            on_step=self.on_step,
            on_event=self.on_event,
            on_checkpoint=self.on_checkpoint,
            should_stop=self.should_stop,
        )


def train_engine(case: Case, flush_seconds: float) -> Trained:
    run = prepare_run(case.spec, case.files)
    precision = run.parts.precision
    spec = case.spec
    model = copy.deepcopy(case.initial).to(precision.device, precision.parameter_dtype)
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    scheduler = build_scheduler(spec.lr_schedule, optimizer, run.total_steps)
    run.parts = StepParts(
        model, optimizer, scheduler, precision.grad_scaler(), precision, spec.grad_clip_norm
    )
    progress, stopwatch = InMemoryProgress(flush_seconds), Stopwatch(case.device)
    stopwatch.start()
    result = drive(run, progress.callbacks())
    stopwatch.stop()
    steps = len(case.windows)
    assert result.status == "completed" and result.step == steps
    assert progress.written_metrics == steps and progress.checkpoints[-1] == steps
    return stopwatch, model


def checkpoint_milliseconds(case: Case) -> float:
    """One make_checkpoint (weights, optimizer state, RNG) once AdamW has its state."""
    run = prepare_run(case.shortened(2).spec, case.files)
    drive(run)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        saved = make_checkpoint(run, None)
        saved.write_weights(_Discard())  # serialised as the worker does, into nowhere
        saved.write_state(_Discard())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


class _Discard:
    """A sink that keeps nothing: what serialising a checkpoint costs, without storing it."""

    def write(self, data: bytes | memoryview, /) -> int:
        return len(memoryview(data).cast("B"))

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------- the others


def adamw(model: nn.Module, spec: JobSpec) -> torch.optim.AdamW:
    # What a user writes; the same settings the engine's build_optimizer gives AdamW.
    options = spec.optimizer
    return torch.optim.AdamW(
        model.parameters(), lr=options.lr, betas=options.betas, weight_decay=options.weight_decay
    )


def autocast(case: Case) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on the case's device; in fp32 nothing (not even a disabled autocast)."""
    if not case.bf16:
        return contextlib.nullcontext()
    return torch.autocast(case.device.type, dtype=torch.bfloat16)


def train_hand(case: Case) -> Trained:
    device = case.device
    model = copy.deepcopy(case.initial).to(device)
    optimizer = adamw(model, case.spec)
    data, stopwatch = case.data, Stopwatch(device)
    stopwatch.start()
    for window in case.windows:
        units = data.loss_units([index for indices in window for index in indices])
        for indices in window:
            batch = data.collate(indices)
            with autocast(case):
                logits = model(batch.inputs.to(device))
            loss = F.cross_entropy(
                logits.float().flatten(0, -2),
                batch.targets.to(device).flatten(),
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
            (loss / units).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stopwatch.stop(), model


class MicroBatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The case's micro-batches in order, one DataLoader item each (batch_size=None)."""

    def __init__(self, case: Case) -> None:
        self.data = case.data
        self.micro_batches = [indices for window in case.windows for indices in window]

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.data.collate(self.micro_batches[item])
        return batch.inputs, batch.targets


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # From fp32 logits, as the engine and the hand loop take it (a no-op in fp32).
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def train_accelerate(case: Case) -> Trained:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.state import AcceleratorState, GradientState  # type: ignore[import-untyped]

    # One Accelerator per run: forget the previous run's accumulation settings.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=case.accumulation_steps,
        cpu=case.device.type == "cpu",
        mixed_precision="bf16" if case.bf16 else "no",
    )
    model = copy.deepcopy(case.initial)
    optimizer = adamw(model, case.spec)
    loader = DataLoader(MicroBatches(case), batch_size=None, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    torch.set_num_threads(case.threads)
    stopwatch = Stopwatch(case.device)
    stopwatch.start()
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            loss = mean_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    stopwatch.stop()
    unwrapped: nn.Module = accelerator.unwrap_model(model)
    return stopwatch, unwrapped


def train_lightning(case: Case) -> Trained:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> Any:
            inputs, targets = batch
            return mean_loss(self.model(inputs), targets)

        def configure_optimizers(self) -> Any:
            return adamw(self.model, case.spec)

    stopwatch = Stopwatch(case.device)

    class Timer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            stopwatch.start()

        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            stopwatch.stop()

    model = copy.deepcopy(case.initial)
    timer = Timer()
    trainer = L.Trainer(
        accumulate_grad_batches=case.accumulation_steps,
        accelerator="gpu" if case.device.type == "cuda" else "cpu",
        precision="bf16-mixed" if case.bf16 else "32-true",
        devices=1,
        max_epochs=1,
        max_steps=len(case.windows),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    torch.set_num_threads(case.threads)
    trainer.fit(Module(model), DataLoader(MicroBatches(case), batch_size=None, shuffle=False))
    assert trainer.global_step == len(case.windows)
    return stopwatch, model


# ---------------------------------------------------------------- measuring


def flat_weights(model: nn.Module) -> torch.Tensor:
    """On the CPU in fp32, wherever the model trained."""
    return torch.cat(
        [parameter.detach().float().cpu().flatten() for parameter in model.parameters()]
    )


def weight_difference(model: nn.Module, reference: torch.Tensor) -> float:
    return float((flat_weights(model) - reference).abs().max() / reference.abs().max())


@dataclass
class PointResult:
    case: Case
    checkpoint_ms: float
    samples_per_second: dict[str, list[float]]
    ratios: dict[str, list[float]]  # to the hand loop of the same round, by wall time
    cpu_ratios: dict[str, list[float]]  # the same by this process's CPU time
    weight_differences: dict[str, float]  # the largest over rounds

    def median_rate(self, variant: str) -> float:
        return statistics.median(self.samples_per_second[variant])

    def median_ratio(self, variant: str) -> float:
        return statistics.median(self.ratios[variant])

    def median_cpu_ratio(self, variant: str) -> float:
        return statistics.median(self.cpu_ratios[variant])


def measure(case: Case, rounds: int, flush_seconds: float) -> PointResult:
    trainers: dict[str, Callable[[Case], Trained]] = {
        "hand": train_hand,
        "engine": lambda case: train_engine(case, flush_seconds),
        "accelerate": train_accelerate,
        "lightning": train_lightning,
    }
    # Warm-up: first calls, lazy imports and the allocator's first pages, untimed.
    warm_up = case.shortened(min(2, len(case.windows)))
    for variant in VARIANTS:
        trainers[variant](warm_up)
    reference = flat_weights(train_hand(case)[1])
    result = PointResult(
        case,
        checkpoint_milliseconds(case),
        {name: [] for name in VARIANTS},
        {name: [] for name in VARIANTS},
        {name: [] for name in VARIANTS},
        {},
    )
    for round_index in range(rounds):
        shift = round_index % len(VARIANTS)
        clocks: dict[str, Stopwatch] = {}
        for variant in (*VARIANTS[shift:], *VARIANTS[:shift]):
            clocks[variant], model = trainers[variant](case)
            difference = weight_difference(model, reference)
            result.weight_differences[variant] = max(
                difference, result.weight_differences.get(variant, 0.0)
            )
        for variant, clock in clocks.items():
            result.samples_per_second[variant].append(case.samples / clock.wall)
            result.ratios[variant].append(clocks["hand"].wall / clock.wall)
            result.cpu_ratios[variant].append(clocks["hand"].cpu / clock.cpu)
    return result


def parameter_count(case: Case) -> int:
    return sum(parameter.numel() for parameter in case.initial.parameters())


def report(results: Sequence[PointResult], tolerance: float) -> bool:
    """Print the tables and the targets; False when some variant ended at other weights."""
    rates, ratios = [], []
    for point in results:
        case = point.case
        where = [case.size, str(case.micro_batch_size), str(case.accumulation_steps)]
        tokens_per_sample = case.tokens / case.samples
        rates.append(
            [
                case.size,
                f"{parameter_count(case):,}",
                *where[1:],
                str(len(case.windows)),
            ]
            + [f"{point.median_rate(variant):.1f}" for variant in VARIANTS]
            + [f"{point.median_rate('engine') * tokens_per_sample:,.0f}"]
        )
        engine = point.ratios["engine"]
        ratios.append(
            [*where, f"{point.median_ratio('engine'):.3f}", f"{min(engine):.3f}-{max(engine):.3f}"]
            + [f"{point.median_ratio(variant):.3f}" for variant in VARIANTS[2:]]
            + [f"{point.median_cpu_ratio(variant):.3f}" for variant in VARIANTS[1:]]
            + [f"{point.checkpoint_ms:.1f}", f"{max(point.weight_differences.values()):.1e}"]
        )
    print("samples/s, median over rounds (wall clock); engine tokens/s: its samples/s × tokens")
    header = ["model", "params", "m", "k", "steps", *(f"{variant}/s" for variant in VARIANTS)]
    print("\n".join(format_table([*header, "engine tokens/s"], rates)))
    print()
    print(
        "× the hand loop: median of the per-round ratios (min-max: the engine's per-round "
        "ratios), by wall clock and by this process's CPU seconds; ckpt ms: one make_checkpoint"
    )
    header = ["model", "m", "k", "engine", "engine min-max", "accelerate", "lightning"]
    header += [f"{variant} cpu" for variant in VARIANTS[1:]]
    header += ["ckpt ms", "max |Δw|/max|w|"]
    print("\n".join(format_table(header, ratios)))
    print()
    for clock, ratio in (("wall", PointResult.median_ratio), ("cpu", PointResult.median_cpu_ratio)):
        lowest = min(results, key=lambda point: ratio(point, "engine"))
        met = ratio(lowest, "engine") >= ENGINE_TARGET
        print(
            f"target engine >= {ENGINE_TARGET}x hand at every point ({clock}): "
            f"{'met' if met else 'NOT met'} (lowest {ratio(lowest, 'engine'):.3f}, "
            f"{point_name(lowest.case)})"
        )
        behind = [
            f"{point_name(point.case)} vs {other}"
            for point in results
            for other in ("accelerate", "lightning")
            if ratio(point, "engine") <= ratio(point, other)
        ]
        print(
            f"target engine ahead of accelerate and lightning at every point ({clock}): "
            + ("met" if not behind else f"NOT met ({', '.join(behind)})")
        )
    worst = max(max(point.weight_differences.values()) for point in results)
    same = worst < tolerance
    print(
        f"same weights (max |Δw|/max|w| < {tolerance:g} against the hand loop, "
        f"every variant and round): {'yes' if same else 'NO'} (largest {worst:.1e})"
    )
    return same


def point_name(case: Case) -> str:
    return f"{case.size} m={case.micro_batch_size} k={case.accumulation_steps}"


def figures(results: Sequence[PointResult], args: argparse.Namespace, same: bool) -> dict[str, Any]:
    """What --json writes: every point's medians, for bench/gpu.py's report."""
    points = []
    for point in results:
        case = point.case
        model = case.spec.model
        points.append(
            {
                "size": case.size,
                "model": model.model_dump(),
                "parameters": parameter_count(case),
                "micro_batch_size": case.micro_batch_size,
                "accumulation_steps": case.accumulation_steps,
                "steps": len(case.windows),
                "tokens_per_sample": case.tokens / case.samples,
                "samples_per_second": {name: point.median_rate(name) for name in VARIANTS},
                "ratio_to_hand": {name: point.median_ratio(name) for name in VARIANTS},
                "cpu_ratio_to_hand": {name: point.median_cpu_ratio(name) for name in VARIANTS},
                "checkpoint_ms": point.checkpoint_ms,
                "weight_difference": max(point.weight_differences.values()),
            }
        )
    return {
        "device": args.device,
        "precision": args.precision,
        "rounds": args.rounds,
        "same_weights": same,
        "points": points,
    }


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, k 1 and 4, one round")
    parser.add_argument("--sizes", nargs="+", choices=sorted(MODELS), default=["small", "large"])
    parser.add_argument("--m", nargs="+", type=int, default=[4], dest="micro_batch_sizes")
    parser.add_argument("--k", nargs="+", type=int, default=[1, 4, 16], dest="ks")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--micro-batches", type=int, help="per timed run (default: per size, about 1 s)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=50, help="engine steps")
    parser.add_argument(
        "--flush-seconds", type=float, default=0.5, help="TRAINJOB_PROGRESS_FLUSH_SECONDS"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=sorted(WEIGHT_TOLERANCE), default="fp32")
    parser.add_argument("--layers", type=int, help="the model's n_layer (default: the size's)")
    parser.add_argument("--width", type=int, help="the model's n_embd")
    parser.add_argument("--heads", type=int, help="the model's n_head")
    parser.add_argument("--sequence", type=int, help="tokens a sample (the model's block_size)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.ks, args.rounds, args.checkpoint_every = ["smoke"], [1, 4], 1, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's advice about DataLoader workers, etc.
    import lightning  # noqa: F401  (first: its import sets its loggers' levels)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for line in machine_lines(["torch", "accelerate", "lightning"]):
        print(line)
    device = args.device.upper()
    if args.device == "cuda":
        device += f" ({torch.cuda.get_device_name()})"
    print(
        f"torch threads {torch.get_num_threads()}; {device}; {args.precision}; tiny-gpt, "
        f"m in {args.micro_batch_sizes}, AdamW; engine: checkpoint every "
        f"{args.checkpoint_every} steps and at the end, flush every {args.flush_seconds} s; "
        f"{args.rounds} rounds"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as folder:
        text_file = Path(folder) / "text.jsonl"
        for size in args.sizes:
            sequence = model_of(size, args)["block_size"]
            if sequence != TINY_TEXT_SEQUENCE:
                write_text_rows(text_file, TEXT_ROWS, sequence + 1)
            micro_batches = args.micro_batches or MICRO_BATCHES[size]
            for micro_batch_size in args.micro_batch_sizes:
                for accumulation_steps in args.ks:
                    if micro_batches % accumulation_steps:
                        raise SystemExit(
                            f"--micro-batches must be a multiple of k={accumulation_steps}"
                        )
                    case = make_case(
                        size, micro_batch_size, accumulation_steps, micro_batches, args, text_file
                    )
                    started = time.perf_counter()
                    results.append(measure(case, args.rounds, args.flush_seconds))
                    print(
                        f"  measured {point_name(case)} ({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
    print()
    same = report(results, WEIGHT_TOLERANCE[args.precision])
    if args.json:
        args.json.write_text(json.dumps(figures(results, args, same), indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
