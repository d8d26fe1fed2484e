"""Throughput of one job on N processes against one process, on the same global batch.

Each variant is a real `trainjob run SPEC --devices N` (N ranks under
torch.distributed.run, gloo on CPU, NCCL on CUDA), run in turns, `--rounds` times. From
each run's metrics.jsonl we take the median step time after the first `--warmup` steps
(the ranks' start-up, imports and the first allocations are not steady state), and print
samples/s per variant and the ratio of each N to N=1 in the same round. On CPU every
variant gets the same cores: N=1 runs with as many threads as there are cores, each of
N ranks with cores/N. `--device cuda` runs the ranks on GPUs (one per rank).

    .venv/bin/python bench/devices.py                    # N = 1, 2 on CPU, 3 rounds
    .venv/bin/python bench/devices.py --devices 1 2 4 --device cuda --hidden 4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def spec(args: argparse.Namespace, devices: int) -> dict[str, Any]:
    micro = args.batch // (devices * args.accumulation_steps)
    return {
        "model": {"type": "mlp", "hidden_sizes": [args.hidden, args.hidden]},
        "dataset": {"type": "synthetic-classification", "n_samples": 8192, "n_features": 256},
        "micro_batch_size": micro,
        "accumulation_steps": args.accumulation_steps,
        "devices": devices,
        "max_steps": args.steps,
        "device": args.device,
        "optimizer": {"type": "adamw", "lr": 1e-3},
    }


def run_once(args: argparse.Namespace, devices: int, folder: Path) -> float:
    """Samples/s: the batch over the median step time after the warm-up."""
    spec_path = folder / f"spec-{devices}.json"
    spec_path.write_text(json.dumps(spec(args, devices)))
    out = folder / f"run-{devices}"
    threads = max(1, (os.cpu_count() or 1) // devices)
    subprocess.run(
        [sys.executable, "-m", "cli.main", "run", str(spec_path), "--out", str(out), "--quiet"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        check=True,
        capture_output=True,
        timeout=1800,
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["step_seconds"] for line in lines][args.warmup :]
    return args.batch / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--accumulation-steps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[int, list[float]] = {n: [] for n in args.devices}
    ratios: dict[int, list[float]] = {n: [] for n in args.devices}
    with tempfile.TemporaryDirectory() as directory:
        for round_number in range(args.rounds):
            # A rotated order each round: no variant always runs first on a cold machine.
            order = args.devices[round_number % len(args.devices) :]
            order += args.devices[: round_number % len(args.devices)]
            this_round = {}
            for devices in order:
                folder = Path(directory) / f"round-{round_number}"
                folder.mkdir(exist_ok=True)
                this_round[devices] = run_once(args, devices, folder)
                rates[devices].append(this_round[devices])
            for devices in args.devices:
                ratios[devices].append(this_round[devices] / this_round[args.devices[0]])
            print(f"round {round_number + 1}: " + ", ".join(
                f"N={n} {this_round[n]:,.0f} samples/s" for n in args.devices
            ), flush=True)  # fmt: skip
    print(f"\nbatch {args.batch}, k {args.accumulation_steps} per rank, mlp {args.hidden}x2, "
          f"{args.device}, {os.cpu_count()} cores, median of {args.rounds} rounds")  # fmt: skip
    print(f"| N | samples/s | ratio to N={args.devices[0]} (same round) |")
    print("|---|---|---|")
    for devices in args.devices:
        print(
            f"| {devices} | {statistics.median(rates[devices]):,.0f} "
            f"| {statistics.median(ratios[devices]):.2f} |"
        )


if __name__ == "__main__":
    main()
