"""A checkpoint save streams into the store: its peak memory is a few chunks, not copies
of the weights and the optimizer state (bench/checkpoint_memory.py, in a child process
whose resident set follows what is live)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkpoint_save_adds_far_less_memory_than_the_checkpoint_s_size() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "checkpoint_memory.py"),
         "--size", "small", "--store", "database", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    measured = json.loads(finished.stdout.strip().splitlines()[-1])
    assert measured["checkpoint_bytes"] > 90 * 2**20  # 8.5 M parameters with AdamW's moments
    # Serialised to bytes and copied into chunks, a save took about twice the checkpoint;
    # streamed, a few 4 MiB chunks (about 0.2 of it here, and less the larger the model).
    assert measured["growth_bytes"] < 0.5 * measured["checkpoint_bytes"], measured
