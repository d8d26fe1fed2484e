"""What sequence packing saves: padding and time per epoch on a variable-length file.

Not part of CI (a smoke run is: `--smoke`, tests/bench/test_packing_smoke.py). A
prompt/completion JSONL file of `--rows` rows is written from the shipped corpus, most
rows short and a few long (lengths drawn log-uniformly between 8 and `--max-length`
bytes, with a seeded generator), and tiny-gpt trains one epoch of it through the engine
(`prepare_run` + `drive`, byte-level, nothing held out) twice, with the same spec but
for `dataset.packing`: unpacked, a sample is a row; packed, a pack of rows of at most
max_length - 1 positions. Each variant's micro-batches are the engine's own for the
seed, cut at `--m` samples, k = 1.

Counted before training, from the collated micro-batches: real tokens (the rows' input
positions, the same for both), the positions the model computes (micro-batch width ×
samples) and so the padded positions. Timed: the `drive` call, `--rounds` times
(interleaved), median. Reported: steps, seconds per epoch, steps/s and real tokens/s,
and the packed/unpacked ratio of real tokens/s (the same rows, so the epoch's speed-up).

    .venv/bin/python bench/packing.py             # 2,000 rows, max_length 256, m 8
    .venv/bin/python bench/packing.py --smoke     # 64 rows, a tiny model, one round
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import CORPUS, TEXT_FILE_ID, format_table, local_files, machine_lines

from app.jobs.spec import JobSpec
from worker.engine.batching import DataPosition
from worker.engine.trainer import Run, drive, prepare_run


def write_prompt_completion_rows(path: Path, rows: int, max_length: int, seed: int) -> None:
    """`rows` {"prompt", "completion"} lines of the corpus: each row's bytes log-uniform in
    [8, max_length], the first quarter of them the prompt."""
    corpus = CORPUS.read_text(encoding="ascii")
    generator = torch.Generator().manual_seed(seed)
    low, high = math.log(8), math.log(max_length)
    with path.open("w", encoding="ascii") as out:
        for row in range(rows):
            draw = float(torch.rand((), generator=generator))
            length = round(math.exp(low + (high - low) * draw))
            start = (row * 997) % (len(corpus) - max_length)
            text = corpus[start : start + length]
            cut = max(1, length // 4)
            out.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")


def spec_for(args: argparse.Namespace, packing: bool) -> JobSpec:
    model = {"type": "tiny-gpt", "n_layer": args.layers, "n_head": 2, "n_embd": args.width}
    return JobSpec.model_validate(
        {
            "model": {**model, "block_size": args.max_length - 1},
            "dataset": {
                "type": "file",
                "file_id": TEXT_FILE_ID,
                "format": "jsonl",
                "max_length": args.max_length,
                "tokenizer": "byte",
                "eval_fraction": 0.0,
                "packing": packing,
            },
            "micro_batch_size": args.m,
            "accumulation_steps": 1,
            "epochs": 1,
            "optimizer": {"type": "adamw", "lr": 1e-3},
            "device": "cpu",
        }
    )


@dataclass
class Measured:
    name: str
    samples: int
    steps: int
    real_tokens: int
    computed_positions: int
    seconds: list[float]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def count_positions(run: Run) -> tuple[int, int]:
    """(real tokens, positions computed) over one epoch's micro-batches."""
    real = computed = 0
    position = DataPosition()
    while position.epoch == 0:
        window = run.planner.window_at(position)
        for indices in window.micro_batches(run.progress.micro_batch_size):
            real += run.data.train.tokens(indices)
            computed += run.data.train.collate(indices).inputs.numel()
        position = run.planner.advance(position, window)
    return real, computed


def timed_epoch(spec: JobSpec, source: Any) -> float:
    run = prepare_run(spec, files=source)
    started = time.perf_counter()
    drive(run)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, source: Any) -> list[Measured]:
    results = []
    for packing in (False, True):
        run = prepare_run(spec_for(args, packing), files=source)
        real, computed = count_positions(run)
        name = "packed" if packing else "unpacked"
        results.append(Measured(name, len(run.data.train), run.total_steps, real, computed, []))
    timed_epoch(spec_for(args, False), source)  # warm-up
    for round_ in range(args.rounds):
        order = results if round_ % 2 == 0 else results[::-1]
        for result in order:
            result.seconds.append(timed_epoch(spec_for(args, result.name == "packed"), source))
    return results


def report(results: Sequence[Measured]) -> list[str]:
    rows = []
    for result in results:
        padded = result.computed_positions - result.real_tokens
        seconds = result.median_seconds
        rows.append(
            [
                result.name,
                str(result.samples),
                str(result.steps),
                f"{result.real_tokens:,}",
                f"{padded:,}",
                f"{padded / result.computed_positions:.1%}",
                f"{seconds:.2f}",
                f"{result.steps / seconds:.1f}",
                f"{result.real_tokens / seconds:,.0f}",
            ]
        )
    header = ["variant", "samples", "steps", "real tokens", "padded", "padding", "s/epoch"]
    lines = format_table([*header, "steps/s", "real tokens/s"], rows)
    unpacked, packed = results
    speed_up = unpacked.median_seconds / packed.median_seconds
    lines.append(f"packed/unpacked real tokens/s: {speed_up:.2f}x")
    return lines


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="64 rows, a tiny model, one round")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256, help="dataset.max_length")
    parser.add_argument("--m", type=int, default=8, help="micro_batch_size (k is 1)")
    parser.add_argument("--layers", type=int, default=2, help="tiny-gpt's n_layer")
    parser.add_argument("--width", type=int, default=64, help="tiny-gpt's n_embd")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.max_length, args.layers, args.width, args.rounds = 64, 64, 1, 16, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rows.jsonl"
        write_prompt_completion_rows(path, args.rows, args.max_length, seed=0)
        results = measure(args, local_files(path))
    lines = machine_lines(["torch"])
    lines.append(
        f"{args.rows} prompt/completion rows of 8..{args.max_length} bytes (log-uniform), "
        f"tiny-gpt n_layer {args.layers} n_embd {args.width}, m {args.m}, k 1, "
        f"{args.threads} thread(s), median of {args.rounds} epoch(s)"
    )
    print("\n".join([*lines, *report(results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
