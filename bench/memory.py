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

    .venv/bin/python bench/memory.py                     # about 30 s
    .venv/bin/python bench/memory.py --smoke --out /tmp/memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import format_table, machine_lines, status_kib

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLOT = ROOT / "docs" / "images" / "memory.png"
TARGET = 0.10
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
}


def make_spec(
    size: str, micro_batch_size: int, accumulation_steps: int, steps: int, device: str
) -> dict[str, Any]:
    model = MODELS[size]
    return {
        "model": model["model"],
        "dataset": {
            "type": "synthetic-classification",
            "n_classes": 10,
            "eval_fraction": 0.0,
            **model["dataset"],
        },
        "micro_batch_size": micro_batch_size,
        "accumulation_steps": accumulation_steps,
        "max_steps": steps,
        "optimizer": {"type": "adamw", "lr": 0.001},
        "device": device,
    }


# ---------------------------------------------------------------- the child


def child(args: argparse.Namespace) -> None:
    """Train one point and print what it measured as one JSON line."""
    import gc

    import torch

    from app.jobs.spec import JobSpec
    from worker.engine.trainer import Callbacks, StepMetrics, drive, prepare_run

    torch.set_num_threads(args.threads)
    spec = JobSpec.model_validate(
        make_spec(
            args.size, args.micro_batch_size, args.accumulation_steps, args.steps, args.device
        )
    )
    run = prepare_run(spec)
    cuda = run.parts.precision.device.type == "cuda"
    gc.collect()
    baseline = status_kib("VmRSS")
    # From here VmHWM is the peak of training alone, not of imports or data generation.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    measured: dict[str, Any] = {"baseline_kib": baseline, "cuda_peak_bytes": None}

    def on_step(metrics: StepMetrics) -> None:
        measured["peak_kib"] = status_kib("VmHWM")
        if cuda:
            measured["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()

    started = time.perf_counter()
    result = drive(run, Callbacks(on_step=on_step))
    assert result.step == args.steps
    measured["seconds"] = time.perf_counter() - started
    measured["device"] = run.parts.precision.device.type
    print(json.dumps(measured), flush=True)


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


def measure(args: argparse.Namespace, micro_batch_size: int, accumulation_steps: int) -> Point:
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
    ]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    finished = subprocess.run(
        command, env=environment, capture_output=True, text=True, check=False, cwd=ROOT
    )
    if finished.returncode != 0:
        raise SystemExit(
            f"child (m={micro_batch_size}, k={accumulation_steps}) failed:\n{finished.stderr}"
        )
    measured = json.loads(finished.stdout.strip().splitlines()[-1])
    return Point(
        micro_batch_size,
        accumulation_steps,
        measured["baseline_kib"],
        measured["peak_kib"],
        measured["cuda_peak_bytes"],
        measured["device"],
    )


def plot(
    ks: Sequence[int], accumulated: Sequence[Point], single: Sequence[Point], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = accumulated[0].micro_batch_size
    cuda = accumulated[0].cuda_peak_bytes is not None
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    axes.plot(ks, [p.peak_mib for p in accumulated], "o-", label=f"(m, k): m = {m}, k windows")
    axes.plot(ks, [p.peak_mib for p in single], "s--", label=f"(m·k, 1): one batch of {m}·k")
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
    parser.add_argument("--steps", type=int, default=2, help="windows per point")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--size", choices=sorted(MODELS), default="mlp", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.ks, args.steps = "smoke", [1, 2], 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        child(args)
        return 0
    m = MODELS[args.size]["micro_batch_size"]
    for line in machine_lines(["torch"]):
        print(line)
    print(
        f"model {json.dumps(MODELS[args.size]['model'])}, m={m}, {args.steps} windows a point, "
        f"torch threads {args.threads}, a fresh child per point, "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    )
    started = time.perf_counter()
    accumulated, single = [], []
    for k in args.ks:
        accumulated.append(measure(args, m, k))
        # (m·1, 1) is (m, 1): one child serves both series at k = 1.
        single.append(accumulated[-1] if k == 1 else measure(args, m * k, 1))
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
            f"{s.peak_mib:.1f}",
            f"{a.peak_mib / reference:.3f}",
            f"{a.growth_mib:.1f}",
            f"{s.growth_mib:.1f}",
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
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
