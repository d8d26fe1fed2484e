"""Memory versus k: the peak memory of training with (m, k) against one batch of (m·k, 1).

Not part of CI (a smoke run is: `--smoke`, tests/bench/test_memory_smoke.py). Every
point runs in a fresh child process (this script with `--child`), with
MALLOC_MMAP_THRESHOLD_=65536 in its environment so that freed blocks of 64 KiB and more
go back to the system and the resident set follows what is live. The child builds the
run with the engine (`prepare_run`: data, model, AdamW), reads its resident set (the
baseline: interpreter, torch, data, model), resets the peak (`5` to
/proc/self/clear_refs), trains `--steps` windows with `drive` and reads the peak
resident set (VmHWM in /proc/self/status) at the last step. On CUDA it reports
torch.cuda.max_memory_allocated over the same steps instead.

The model is an MLP whose activations outweigh its weights at large batches (512
features, two hidden layers of 1024, 10 classes: 1.6 M parameters, 25 MiB with
gradients and AdamW's two moments; about 18 KiB of activations a sample, so 75 MiB at
m·k = 4096, the largest micro-batch a spec allows), m = 128 and k in 1, 2, 4, 8, 16,
32. Target (issue 7): the peak at (m, k) within 10 % of the peak at (m, 1) for every
k. The table gives both peaks, each one's growth over the baseline and (m, k) against
(m, 1); the plot (`--out`) shows both series against k.

`--size gpu` measures tiny-gpt at 12 layers, width 768, sequence 512 instead (the
model bench/loop.py times on a GPU, on rows of the corpus as a text file), m = 4;
`--precision bf16` trains in bf16 autocast. `--search` then looks for the largest
micro-batch that trains at k = 1: doubling from m until a child does not fit, then
bisecting to within an eighth, each probe a child (bounded by `--child-timeout`). A
probe does not fit when the engine backs off from an out-of-memory error (its
`oom_backoff` event: it would halve the micro-batch) or when the spec refuses the
micro-batch (the spec's bound on activation elements); `--search-max` caps it. Then
the largest micro-batch found trains at k = `--search-k`: the largest global batch with
accumulation that was tried, and its peak beside the one without. `--json PATH` writes
the figures for bench/gpu.py. `--optimizer adamw8bit` trains with bitsandbytes' 8-bit
AdamW instead of AdamW (CUDA with the `cuda` extra only): run the same command with each
to see what the optimizer state takes.

`--checkpointing` compares, at one (m, k), a run with `activation_checkpointing` against
one without (issue 17), on tiny-gpt whose activations dwarf its weights (8 layers of
width 64 over sequences of 512 tokens, m = 8, k = 2), each in a child as above. The
child trains one warm-up window first (it allocates AdamW's moments and whatever torch
sets up on its first call), reads its resident set between windows (weights and AdamW
state: the gradients are freed at the end of every window), resets the peak, trains
the other windows and reads the peak. Activation memory is that peak minus that
resident set: what a window adds on top of weights and optimizer state (the
activations kept for backward, and with them the gradients, printed for scale, and
backward's temporaries). It reports both, their ratio (target: checkpointing ≤ 0.6×)
and the ratio of their median window times. On CUDA: max_memory_allocated over
memory_allocated between windows.

`--lora` compares LoRA with full fine-tuning instead (issue 17): tiny-gpt of 4 layers,
width 256, sequence 128 (3.3 M parameters; `--smoke`: the tiny one), AdamW, m = 4, k = 1,
once with every weight trained and once with `"lora": {"r": 8, "alpha": 16}` (adapters
on the attention's qkv and proj layers), each in a fresh child. Counted exactly in the
child: the bytes of every `.grad` just before the optimizer step and of every tensor in
the optimizer's state after it; beside them the peak resident set's growth over the
baseline (on CUDA the max_memory_allocated over the steps). Target: LoRA's gradients and
optimizer state at most 0.1× full fine-tuning's.

    .venv/bin/python bench/memory.py                     # about 30 s
    .venv/bin/python bench/memory.py --checkpointing     # about 30 s
    .venv/bin/python bench/memory.py --lora              # about 15 s
    .venv/bin/python bench/memory.py --smoke --out /tmp/memory.png
    .venv/bin/python bench/memory.py --size gpu --device cuda --precision bf16 --k 1 8 \
        --search --out /tmp/memory-gpu.png              # what bench/gpu.py runs on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    format_table,
    local_files,
    machine_lines,
    status_kib,
    text_file_dataset,
    write_text_rows,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLOT = ROOT / "docs" / "images" / "memory.png"
TARGET = 0.10
# Activation memory with checkpointing over without (issue 17).
CHECKPOINTING_TARGET = 0.6
MMAP_THRESHOLD = "65536"

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {
        "model": {"type": "mlp", "hidden_sizes": [1024, 1024]},
        "dataset": {"n_features": 512, "n_samples": 4096},
        "micro_batch_size": 128,
    },
    "smoke": {
        "model": {"type": "mlp", "hidden_sizes": [64]},
        "dataset": {"n_features": 32, "n_samples": 64},
        "micro_batch_size": 8,
    },
    # Text models: "sequence" tokens a sample, one row of the text file each.
    "gpu": {
        "model": {"type": "tiny-gpt", "n_layer": 12, "n_head": 12, "n_embd": 768},
        "sequence": 512,
        "micro_batch_size": 4,
    },
    "gpt-smoke": {
        "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16},
        "sequence": 32,
        "micro_batch_size": 2,
    },
    # --checkpointing: 0.47 M parameters (5.3 MiB with AdamW's moments) against
    # activations of about 17 MiB a layer at m = 8 (bench: 148 MiB in all).
    "ckpt": {
        "model": {"type": "tiny-gpt", "n_layer": 8, "n_head": 4, "n_embd": 64},
        "sequence": 512,
        "micro_batch_size": 8,
        "accumulation_steps": 2,
    },
    "ckpt-smoke": {
        "model": {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 16},
        "sequence": 32,
        "micro_batch_size": 2,
        "accumulation_steps": 2,
    },
    # --lora: a tiny-gpt of a few million parameters.
    "lora": {
        "model": {"type": "tiny-gpt", "n_layer": 4, "n_head": 4, "n_embd": 256},
        "sequence": 128,
        "micro_batch_size": 4,
    },
}
LORA = {"r": 8, "alpha": 16}
LORA_TARGET = 0.10


def make_spec(
    size: str,
    micro_batch_size: int,
    accumulation_steps: int,
    steps: int,
    device: str,
    precision: str = "fp32",
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
) -> dict[str, Any]:
    model = MODELS[size]
    if "sequence" in model:
        sequence = model["sequence"]
        network = model["model"] | {"block_size": sequence}
        dataset = text_file_dataset(sequence + 1)
    else:
        network = model["model"]
        dataset = {
            "type": "synthetic-classification",
            "n_classes": 10,
            "eval_fraction": 0.0,
            **model["dataset"],
        }
    return {
        "model": network,
        "dataset": dataset,
        "micro_batch_size": micro_batch_size,
        "accumulation_steps": accumulation_steps,
        "max_steps": steps,
        "optimizer": {"type": optimizer, "lr": 0.001},
        "device": device,
        "precision": precision,
        "activation_checkpointing": activation_checkpointing,
    }


# ---------------------------------------------------------------- the child


class DoesNotFit(Exception):
    """The engine is about to halve the micro-batch: this one does not fit."""


def child(args: argparse.Namespace) -> None:
    """Train one point and print what it measured as one JSON line; with `fits` false
    (and why) when the micro-batch does not fit or the spec refuses it."""
    import gc

    import torch
    from pydantic import ValidationError

    from app.jobs.spec import JobSpec, validation_messages
    from worker.engine.errors import TrainingError
    from worker.engine.trainer import Callbacks, StepMetrics, drive, prepare_run

    torch.set_num_threads(args.threads)
    try:
        spec = JobSpec.model_validate(
            make_spec(
                args.size,
                args.micro_batch_size,
                args.accumulation_steps,
                args.steps,
                args.device,
                args.precision,
                args.optimizer,
                args.activation_checkpointing,
            )
        )
    except ValidationError as error:
        print(json.dumps({"fits": False, "reason": "spec: " + validation_messages(error)[0]}))
        return
    folder = tempfile.TemporaryDirectory(prefix="memory-bench-")
    text_file = Path(folder.name) / "text.jsonl"
    if "sequence" in MODELS[args.size]:
        # One epoch per window: every window is the whole file.
        window = args.micro_batch_size * args.accumulation_steps
        write_text_rows(text_file, window, MODELS[args.size]["sequence"] + 1)
    run = prepare_run(spec, local_files(text_file))
    cuda = run.parts.precision.device.type == "cuda"
    gc.collect()
    baseline = status_kib("VmRSS")
    # From here VmHWM is the peak of training alone, not of imports or data generation.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    measured: dict[str, Any] = {"fits": True, "baseline_kib": baseline, "cuda_peak_bytes": None}

    measured["step_seconds"] = []
    if args.warm_up:
        measured["gradient_bytes"] = sum(
            p.numel() * p.element_size() for p in run.parts.model.parameters() if p.requires_grad
        )

    def on_step(metrics: StepMetrics) -> None:
        if args.warm_up and metrics.step == 1:
            # Between windows: weights and AdamW's state (gradients are freed at a window's
            # end). The windows after this one are measured from here.
            gc.collect()
            measured["between_steps_kib"] = status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
            if cuda:
                measured["cuda_between_steps_bytes"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            return
        measured["step_seconds"].append(metrics.step_seconds)
        measured["peak_kib"] = status_kib("VmHWM")
        if cuda:
            measured["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "oom_backoff":
            raise DoesNotFit(f"out of memory at m={data['old_micro_batch_size']}")

    started = time.perf_counter()
    try:
        result = drive(run, Callbacks(on_step=on_step, on_event=on_event))
    except DoesNotFit as error:
        print(json.dumps({"fits": False, "reason": str(error)}), flush=True)
        return
    except TrainingError as error:
        if error.type != "out_of_memory":
            raise
        print(json.dumps({"fits": False, "reason": error.message}), flush=True)
        return
    assert result.step == args.steps
    measured["seconds"] = time.perf_counter() - started
    measured["device"] = run.parts.precision.device.type
    print(json.dumps(measured), flush=True)
    folder.cleanup()


def lora_child(args: argparse.Namespace) -> None:
    """Train `--lora-child` (full or lora) fine-tuning of MODELS[--size] and print one JSON
    line: gradient and optimizer-state bytes, counted, and the peak memory."""
    import gc

    import torch

    from app.jobs.spec import JobSpec
    from worker.engine.hooks import Hooks
    from worker.engine.trainer import Callbacks, StepMetrics, drive, prepare_run

    torch.set_num_threads(args.threads)
    raw = make_spec(args.size, args.micro_batch_size, 1, args.steps, args.device, args.precision)
    if args.lora_child == "lora":
        raw["lora"] = LORA
    spec = JobSpec.model_validate(raw)
    folder = tempfile.TemporaryDirectory(prefix="memory-bench-")
    text_file = Path(folder.name) / "text.jsonl"
    write_text_rows(text_file, args.micro_batch_size, MODELS[args.size]["sequence"] + 1)
    run = prepare_run(spec, local_files(text_file))
    cuda = run.parts.precision.device.type == "cuda"
    gc.collect()
    baseline = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, optimizer = run.parts.model, run.parts.optimizer
    measured: dict[str, Any] = {
        "baseline_kib": baseline,
        "cuda_peak_bytes": None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gradient_bytes": 0,
    }

    def tensor_bytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def before_step() -> None:
        # Every gradient the window made, at its largest: just before the update frees it.
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        measured["gradient_bytes"] = max(measured["gradient_bytes"], tensor_bytes(gradients))

    def on_step(metrics: StepMetrics) -> None:
        state = [value for entry in optimizer.state.values() for value in entry.values()]
        measured["optimizer_state_bytes"] = tensor_bytes(state)
        measured["peak_kib"] = status_kib("VmHWM")
        if cuda:
            measured["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()

    drive(run, Callbacks(on_step=on_step), Hooks(before_step=before_step))
    measured["device"] = run.parts.precision.device.type
    print(json.dumps(measured), flush=True)
    folder.cleanup()


# ---------------------------------------------------------------- the parent


@dataclass(frozen=True)
class Point:
    micro_batch_size: int
    accumulation_steps: int
    baseline_kib: int
    peak_kib: int
    cuda_peak_bytes: int | None
    device: str

    @property
    def peak_mib(self) -> float:
        if self.cuda_peak_bytes is not None:
            return self.cuda_peak_bytes / 2**20
        return self.peak_kib / 1024

    @property
    def growth_mib(self) -> float:
        """Over the baseline (CPU); on CUDA the peak itself, which starts from zero."""
        if self.cuda_peak_bytes is not None:
            return self.peak_mib
        return (self.peak_kib - self.baseline_kib) / 1024


class ChildFailed(Exception):
    pass


def run_child(
    args: argparse.Namespace,
    micro_batch_size: int,
    accumulation_steps: int,
    activation_checkpointing: bool = False,
    warm_up: bool = False,
    lora_child: str | None = None,
) -> dict[str, Any]:
    """One point in a fresh child: what it printed. ChildFailed when it failed or ran past
    --child-timeout (it is then killed). `warm_up`: measured from the end of the first
    window (between_steps_kib) instead of from before training."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--size",
        args.size,
        "--micro-batch-size",
        str(micro_batch_size),
        "--accumulation-steps",
        str(accumulation_steps),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--optimizer",
        args.optimizer,
        *(["--activation-checkpointing"] if activation_checkpointing else []),
        *(["--warm-up"] if warm_up else []),
        *(["--lora-child", lora_child] if lora_child else []),
    ]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    child = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    # In our process group (it starts none of its own): whoever stops us stops it too.
    where = f"child (m={micro_batch_size}, k={accumulation_steps})"
    try:
        stdout, stderr = child.communicate(timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise ChildFailed(f"{where} ran past {args.child_timeout:g} s") from None
    if child.returncode != 0:
        raise ChildFailed(f"{where} failed:\n{stderr}")
    measured: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return measured


def measure(args: argparse.Namespace, micro_batch_size: int, accumulation_steps: int) -> Point:
    measured = run_child(args, micro_batch_size, accumulation_steps)
    if not measured["fits"]:
        raise ChildFailed(
            f"(m={micro_batch_size}, k={accumulation_steps}) does not fit: {measured['reason']}"
        )
    return point_of(micro_batch_size, accumulation_steps, measured)


def point_of(micro_batch_size: int, accumulation_steps: int, measured: dict[str, Any]) -> Point:
    return Point(
        micro_batch_size,
        accumulation_steps,
        measured["baseline_kib"],
        measured["peak_kib"],
        measured["cuda_peak_bytes"],
        measured["device"],
    )


def measure_single(args: argparse.Namespace, micro_batch_size: int) -> Point | str:
    """(m·k, 1), or why it does not fit: where accumulation is the only way to that batch."""
    measured = run_child(args, micro_batch_size, 1)
    if not measured["fits"]:
        return str(measured["reason"])
    return point_of(micro_batch_size, 1, measured)


@dataclass(frozen=True)
class Probe:
    micro_batch_size: int
    accumulation_steps: int
    fits: bool
    peak_mib: float | None
    reason: str | None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation_steps


@dataclass(frozen=True)
class Search:
    """The largest micro-batch that trained at k = 1, what stopped the search there, and
    that micro-batch at k = `accumulated.accumulation_steps`."""

    largest: int  # 0: not even the first probe fitted
    stopped_by: str
    probes: list[Probe]
    accumulated: Probe | None


def probe(args: argparse.Namespace, micro_batch_size: int, accumulation_steps: int) -> Probe:
    measured = run_child(args, micro_batch_size, accumulation_steps)
    print(
        f"  probe m={micro_batch_size} k={accumulation_steps}: "
        + ("fits" if measured["fits"] else f"does not fit ({measured['reason']})"),
        flush=True,
    )
    if not measured["fits"]:
        return Probe(micro_batch_size, accumulation_steps, False, None, measured["reason"])
    peak = point_of(micro_batch_size, accumulation_steps, measured).peak_mib
    return Probe(micro_batch_size, accumulation_steps, True, peak, None)


def search_largest(args: argparse.Namespace, start: Point) -> Search:
    """Doubling from `start` (the table's (m, 1), measured already) until a probe does not
    fit (or --search-max), then bisecting until the gap is within an eighth of what fits."""
    probes = [Probe(start.micro_batch_size, 1, True, start.peak_mib, None)]
    fits, fails = start.micro_batch_size, None
    stopped_by = f"--search-max {args.search_max}"
    size = min(fits * 2, args.search_max)
    while fits < args.search_max:
        probes.append(probe(args, size, 1))
        if not probes[-1].fits:
            fails, stopped_by = size, str(probes[-1].reason)
            break
        fits, size = size, min(size * 2, args.search_max)
    while fails is not None and fails - fits > max(1, fits // 8):
        middle = (fits + fails) // 2
        probes.append(probe(args, middle, 1))
        if probes[-1].fits:
            fits = middle
        else:
            fails, stopped_by = middle, str(probes[-1].reason)
    accumulated = probe(args, fits, args.search_k) if fits else None
    return Search(fits, stopped_by, probes, accumulated)


def plot(
    ks: Sequence[int], accumulated: Sequence[Point], single: Sequence[Point | str], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = accumulated[0].micro_batch_size
    cuda = accumulated[0].cuda_peak_bytes is not None
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    axes.plot(ks, [p.peak_mib for p in accumulated], "o-", label=f"(m, k): m = {m}, k windows")
    fitted = [(k, p.peak_mib) for k, p in zip(ks, single, strict=True) if isinstance(p, Point)]
    axes.plot(*zip(*fitted, strict=True), "s--", label=f"(m·k, 1): one batch of {m}·k")
    if not cuda:
        baseline = accumulated[0].baseline_kib / 1024
        axes.axhline(baseline, color="grey", linewidth=0.8, linestyle=":")
        axes.annotate(
            "resident before training (torch, data, model)",
            (ks[0], baseline),
            textcoords="offset points",
            xytext=(2, 4),
            fontsize=8,
            color="grey",
        )
        axes.set_ylim(bottom=baseline - 10)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(ks), [str(k) for k in ks])
    axes.set_xlabel("k (accumulation steps); the window is m·k samples in both series")
    axes.set_ylabel("peak allocated, MiB (CUDA)" if cuda else "peak RSS, MiB")
    axes.set_title("Peak memory of a training step: (m, k) against (m·k, 1)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, k 1 and 2, one step")
    parser.add_argument("--out", type=Path, default=DEFAULT_PLOT, help="the PNG to write")
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32], dest="ks")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing on vs off at one (m, k), model ckpt (issue 17)",
    )
    parser.add_argument(
        "--steps", type=int, help="windows per point (2; --checkpointing: 4, the first a warm-up)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--size", choices=sorted(MODELS), help="mlp; --checkpointing: ckpt")
    parser.add_argument("--search", action="store_true", help="the largest batch that trains")
    parser.add_argument("--search-max", type=int, default=4096, help="micro-batches above: none")
    parser.add_argument("--search-k", type=int, default=8, help="k of the accumulation probe")
    parser.add_argument("--child-timeout", type=float, default=120, help="seconds per child")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--lora", action="store_true", help="LoRA against full fine-tuning of a tiny-gpt"
    )
    parser.add_argument("--lora-child", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lora:
        args.size = "gpt-smoke" if args.smoke else "lora"
        args.steps = 1 if args.smoke else args.steps
    elif args.smoke and args.checkpointing:
        args.size, args.steps = "ckpt-smoke", 2
    elif args.smoke:
        args.size, args.ks, args.steps = "smoke", [1, 2], 1
    args.size = args.size or ("ckpt" if args.checkpointing else "mlp")
    args.steps = args.steps or (4 if args.checkpointing else 2)
    return args


def peak_cell(point: Point | str) -> str:
    return f"{point.peak_mib:.1f}" if isinstance(point, Point) else "does not fit"


def growth_cell(point: Point | str) -> str:
    return f"{point.growth_mib:.1f}" if isinstance(point, Point) else "-"


def report_search(found: Search, unit: str) -> None:
    print()
    print(f"largest batch that trains (a child per probe, {unit}):")
    rows = [
        [
            str(probe.micro_batch_size),
            str(probe.accumulation_steps),
            str(probe.global_batch),
            f"{probe.peak_mib:.1f}" if probe.peak_mib is not None else "-",
            "yes" if probe.fits else f"no: {probe.reason}",
        ]
        for probe in [*found.probes, *([found.accumulated] if found.accumulated else [])]
    ]
    print("\n".join(format_table(["m", "k", "m·k", unit, "fits"], rows)))
    print(f"without accumulation: {found.largest} (the next size up: {found.stopped_by})")
    if found.accumulated is not None:
        accumulated = found.accumulated
        print(
            f"with accumulation: {accumulated.global_batch} "
            f"(m={accumulated.micro_batch_size}, k={accumulated.accumulation_steps}): "
            + ("trains" if accumulated.fits else f"does not train ({accumulated.reason})")
            + "; the peak does not grow with k, so a larger k is bounded by time and the "
            "spec's batch_size, not by memory"
        )


@dataclass(frozen=True)
class WindowMemory:
    """One child of --checkpointing, in MiB: the resident set between windows (weights and
    optimizer state) and the peak of the windows after the first; on CUDA allocated
    memory instead."""

    activation_checkpointing: bool
    between_windows_mib: float
    peak_mib: float
    gradient_mib: float
    window_seconds: float  # the median of the measured windows
    device: str

    @property
    def activation_mib(self) -> float:
        """What a window adds over weights and optimizer state: activations kept for
        backward, and the gradients and temporaries of backward."""
        return self.peak_mib - self.between_windows_mib


def measure_window(args: argparse.Namespace, activation_checkpointing: bool) -> WindowMemory:
    model = MODELS[args.size]
    m, k = model["micro_batch_size"], model["accumulation_steps"]
    measured = run_child(args, m, k, activation_checkpointing, warm_up=True)
    if not measured["fits"]:
        raise ChildFailed(f"(m={m}, k={k}) does not fit: {measured['reason']}")
    if measured["cuda_peak_bytes"] is not None:
        between = measured["cuda_between_steps_bytes"] / 2**20
        peak = measured["cuda_peak_bytes"] / 2**20
    else:
        between, peak = measured["between_steps_kib"] / 1024, measured["peak_kib"] / 1024
    return WindowMemory(
        activation_checkpointing,
        between,
        peak,
        measured["gradient_bytes"] / 2**20,
        statistics.median(measured["step_seconds"]),
        measured["device"],
    )


def compare_checkpointing(args: argparse.Namespace) -> int:
    """Activation checkpointing off, then on, at the model's (m, k): one child each."""
    model = MODELS[args.size]
    for line in machine_lines(["torch"]):
        print(line)
    print(
        f"model {json.dumps(model['model'])}, sequences of {model['sequence']} tokens, "
        f"m={model['micro_batch_size']}, k={model['accumulation_steps']}, {args.steps} windows "
        f"a child (the first a warm-up), {args.precision}, torch threads {args.threads}, "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    )
    started = time.perf_counter()
    try:
        plain, checkpointed = (measure_window(args, on) for on in (False, True))
    except ChildFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    unit = "MiB allocated" if plain.device == "cuda" else "MiB RSS"
    print(
        f"device {plain.device}; activation memory: the peak over windows 2..{args.steps} "
        f"minus the {unit} between windows 1 and 2 (weights and AdamW's state; gradients "
        f"are freed at each window's end), so activations kept for backward plus the "
        f"gradients ({plain.gradient_mib:.1f} MiB) and backward's temporaries"
    )
    header = [
        "checkpointing",
        f"between windows {unit}",
        f"peak {unit}",
        "activation MiB",
        "window s",
    ]
    rows = [
        [
            "on" if point.activation_checkpointing else "off",
            f"{point.between_windows_mib:.1f}",
            f"{point.peak_mib:.1f}",
            f"{point.activation_mib:.1f}",
            f"{point.window_seconds:.3f}",
        ]
        for point in (plain, checkpointed)
    ]
    print("\n".join(format_table(header, rows)))
    ratio = checkpointed.activation_mib / plain.activation_mib
    slowdown = checkpointed.window_seconds / plain.window_seconds
    met = ratio <= CHECKPOINTING_TARGET
    print(
        f"activation memory on/off: {ratio:.3f} (target ≤ {CHECKPOINTING_TARGET}: "
        f"{'met' if met else 'NOT met'}); window time on/off: {slowdown:.3f}"
    )
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {
            "device": plain.device,
            "unit": unit,
            "model": model["model"],
            "points": [asdict(plain), asdict(checkpointed)],
            "activation_ratio": ratio,
            "window_time_ratio": slowdown,
            "target_met": met,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        if args.lora_child:
            lora_child(args)
        else:
            child(args)
        return 0
    if args.checkpointing:
        return compare_checkpointing(args)
    if args.lora:
        return compare_lora(args)
    m = MODELS[args.size]["micro_batch_size"]
    for line in machine_lines(["torch"]):
        print(line)
    print(
        f"model {json.dumps(MODELS[args.size]['model'])}, m={m}, {args.steps} windows a point, "
        f"{args.precision}, {'8-bit AdamW, ' if args.optimizer == 'adamw8bit' else ''}"
        f"torch threads {args.threads}, a fresh child per point, "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    )
    started = time.perf_counter()
    accumulated: list[Point] = []
    single: list[Point | str] = []
    try:
        for k in args.ks:
            accumulated.append(measure(args, m, k))
            # (m·1, 1) is (m, 1): one child serves both series at k = 1.
            single.append(accumulated[-1] if k == 1 else measure_single(args, m * k))
    except ChildFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    device = accumulated[0].device
    unit = "peak MiB" if device == "cuda" else "peak RSS MiB"
    header = [
        "k",
        f"(m,k) {unit}",
        f"(m·k,1) {unit}",
        "(m,k)/(m,1)",
        "(m,k) growth",
        "(m·k,1) growth",
    ]
    reference = accumulated[0].peak_mib
    rows = [
        [
            str(k),
            f"{a.peak_mib:.1f}",
            peak_cell(s),
            f"{a.peak_mib / reference:.3f}",
            f"{a.growth_mib:.1f}",
            growth_cell(s),
        ]
        for k, a, s in zip(args.ks, accumulated, single, strict=True)
    ]
    print(f"device {device}; growth: peak minus the resident set before training, MiB")
    print("\n".join(format_table(header, rows)))
    worst = max(accumulated, key=lambda point: abs(point.peak_mib / reference - 1))
    change = worst.peak_mib / reference - 1
    met = all(abs(point.peak_mib / reference - 1) <= TARGET for point in accumulated)
    print(
        f"target (m, k) peak within {TARGET:.0%} of (m, 1) for every k: "
        f"{'met' if met else 'NOT met'} (largest change {change:+.1%} at "
        f"k={worst.accumulation_steps})"
    )
    plot(args.ks, accumulated, single, args.out)
    print(f"plot: {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    found = None
    if args.search:
        try:
            found = search_largest(args, accumulated[0])
        except ChildFailed as error:
            print(f"FAILED: {error}", file=sys.stderr)
            return 1
        report_search(found, unit)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {
            "device": device,
            "unit": unit,
            "precision": args.precision,
            "model": MODELS[args.size]["model"],
            "micro_batch_size": m,
            "points": [
                {
                    "accumulation_steps": k,
                    "accumulated_peak_mib": a.peak_mib,
                    "single_peak_mib": s.peak_mib if isinstance(s, Point) else None,
                    "single_does_not_fit": s if isinstance(s, str) else None,
                }
                for k, a, s in zip(args.ks, accumulated, single, strict=True)
            ],
            "target_met": met,
            "search": asdict(found) if found else None,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def compare_lora(args: argparse.Namespace) -> int:
    """LoRA against full fine-tuning of the same model: gradients and optimizer state,
    counted, and the peak memory, side by side from one run."""
    m = MODELS[args.size]["micro_batch_size"]
    for line in machine_lines(["torch", "peft"]):
        print(line)
    print(
        f"model {json.dumps(MODELS[args.size]['model'])}, sequence "
        f"{MODELS[args.size]['sequence']}, m={m}, k=1, AdamW, {args.steps} windows, "
        f"{args.precision}, torch threads {args.threads}, lora {json.dumps(LORA)}, a fresh "
        f"child each, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    )
    started = time.perf_counter()
    try:
        full, lora = (run_child(args, m, 1, mode) for mode in ("full", "lora"))
    except ChildFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1

    def state_and_gradients(measured: dict[str, Any]) -> int:
        return int(measured["gradient_bytes"] + measured["optimizer_state_bytes"])

    def peak_growth_mib(measured: dict[str, Any]) -> float:
        if measured["cuda_peak_bytes"] is not None:
            return float(measured["cuda_peak_bytes"]) / 2**20
        return (measured["peak_kib"] - measured["baseline_kib"]) / 1024

    device = full["device"]
    peak = "peak MiB" if device == "cuda" else "peak RSS growth MiB"
    header = ["", "trained params", "gradients MiB", "optimizer MiB", "both MiB", peak]
    rows = [
        [
            name,
            f"{measured['trainable']:,} of {measured['parameters']:,}",
            f"{measured['gradient_bytes'] / 2**20:.3f}",
            f"{measured['optimizer_state_bytes'] / 2**20:.3f}",
            f"{state_and_gradients(measured) / 2**20:.3f}",
            f"{peak_growth_mib(measured):.1f}",
        ]
        for name, measured in (("full", full), ("lora", lora))
    ]
    ratio = state_and_gradients(lora) / state_and_gradients(full)
    rows.append(
        [
            "lora/full",
            f"{lora['trainable'] / full['trainable']:.4f}",
            "",
            "",
            f"{ratio:.4f}",
            f"{peak_growth_mib(lora) / peak_growth_mib(full):.3f}",
        ]
    )
    print(f"device {device}; gradients and optimizer state counted in bytes after a step")
    print("\n".join(format_table(header, rows)))
    met = ratio <= LORA_TARGET
    print(
        f"target LoRA gradients + optimizer state <= {LORA_TARGET:g}x full fine-tuning's: "
        f"{'met' if met else 'NOT met'} ({ratio:.4f}x)"
    )
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {"device": device, "full": full, "lora": lora, "ratio": ratio, "met": met}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
