"""A real CUDA out-of-memory backoff, in a process of its own (`python -m
tests.cuda.out_of_memory_run`): the memory cap it sets stays with it. Prints one JSON
line for tests/cuda/test_out_of_memory.py.

It measures the memory one window takes at micro-batches of 32 and 16 (the same window
of 32), caps the process halfway between, and trains the window of 32 again: 32 no
longer fits, and the engine backs off."""

from __future__ import annotations

import gc
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.cuda.lane import flat_weights, relative_error
from tests.worker.engine.conftest import make_spec
from worker.engine.trainer import Callbacks, StepMetrics, train

WINDOW = 32
FILE_ID = "file_" + "3" * 24
# Activations dominate: 4 layers over 512 tokens, about 40 MB per sample in fp32.
GPT = {"type": "tiny-gpt", "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 512}


def texts_file(directory: Path) -> Path:
    """Two windows of texts of 480 to 511 characters: every window a full 32."""
    generator = random.Random(0)
    rows = [
        {"text": "".join(generator.choice("abcdefgh ") for _ in range(generator.randint(480, 511)))}
        for _ in range(2 * WINDOW)
    ]
    path = directory / f"{FILE_ID}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


FILES: dict[str, Path] = {}


def spec(micro: int) -> Any:
    dataset = {"type": "file", "file_id": FILE_ID, "max_length": 512, "eval_fraction": 0}
    return make_spec(
        model=GPT, dataset=dataset,
        precision="fp32", device="cuda", micro_batch_size=micro,
        accumulation_steps=WINDOW // micro, max_steps=3,
        optimizer={"type": "adamw", "lr": 0.001},
    )  # fmt: skip


def measured(micro: int) -> tuple[torch.Tensor, int]:
    """The final weights and the most memory the allocator reserved, from an empty cache."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = flat_weights(train(spec(micro), files=FILES.__getitem__).model)
    peak = torch.cuda.max_memory_reserved()
    gc.collect()
    torch.cuda.empty_cache()
    return weights, peak


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        FILES[FILE_ID] = texts_file(Path(directory))
        report()


def report() -> None:
    whole, whole_peak = measured(WINDOW)
    half, half_peak = measured(WINDOW // 2)
    # The cap counts what the allocator reserves from the device (cached blocks too).
    cap = (whole_peak + half_peak) // 2
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    events: list[tuple[str, dict[str, Any]]] = []
    metrics: list[StepMetrics] = []
    backed_off = flat_weights(
        train(
            spec(WINDOW),
            files=FILES.__getitem__,
            callbacks=Callbacks(
                on_step=metrics.append, on_event=lambda kind, data: events.append((kind, data))
            ),
        ).model
    )
    in_use = metrics[-1].micro_batch_size
    # A run started at the micro-batch the backoff ended at (16, or smaller if the cap
    # left less room than measured).
    started_there = half if in_use == WINDOW // 2 else measured(in_use)[0]
    print(
        json.dumps(
            {
                "peaks_mib": [whole_peak >> 20, half_peak >> 20, cap >> 20],
                "backoffs": [
                    [data["old_micro_batch_size"], data["new_micro_batch_size"]]
                    for kind, data in events
                    if kind == "oom_backoff"
                ],
                "splits": [[m.micro_batch_size, m.accumulation_steps] for m in metrics],
                "samples": [m.window_samples for m in metrics],
                "error_to_started_there": relative_error(backed_off, started_there),
                "error_to_one_batch": relative_error(backed_off, whole),
            }
        )
    )


if __name__ == "__main__":
    main()
