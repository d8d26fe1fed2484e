"""Faults a worker injects on purpose (TRAINJOB_TEST_FAULTS), for testing only.

- `nan` fills every input with NaN;
- `oom[=N]` raises out-of-memory in the forward pass of every training micro-batch of
  more than N samples (default 0: all of them);
- `oom_backward[=N]` the same, inside the backward pass;
- `oom_step` raises out-of-memory in every optimizer step;
- `oom_eval[=N]` raises out-of-memory for every evaluation batch of more than N samples;
- `slow=SECONDS` sleeps that long per micro-batch;
- `oom_rank=R` keeps the out-of-memory faults to rank R of a job on several devices
  (the others, and one-device runs, are spared), as when one device fills first.

They go through the engine's hooks, the same path the engine's own tests use, so a
worker process can be shown to fail `nan_loss` or `out_of_memory`, or to back off,
without a GPU and without a spec that diverges.

`kill_validation` makes a file's validation SIGKILL its own process, as the OOM killer
would (worker/datafiles/runner.py). torch is imported only by the training hooks: the
validation task reads these faults too, and never imports torch.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine.data_types import Batch
    from worker.engine.hooks import BatchHook, Hooks

KNOWN_FAULTS = frozenset(
    {"nan", "oom", "oom_backward", "oom_step", "oom_eval", "oom_rank", "slow", "kill_validation"}
)


def parse_faults(value: str | None) -> dict[str, float]:
    """`nan,slow=0.01` → {"nan": 0.0, "slow": 0.01}."""
    faults: dict[str, float] = {}
    for part in (value or "").split(","):
        name, _, argument = part.strip().partition("=")
        if not name:
            continue
        if name not in KNOWN_FAULTS:
            raise ValueError(
                f"TRAINJOB_TEST_FAULTS: unknown {name!r}; known: {sorted(KNOWN_FAULTS)}"
            )
        faults[name] = float(argument) if argument else 0.0
    return faults


def fault_hooks(value: str | None) -> Hooks:
    import torch  # here, not at the top: the validation task imports this module

    from worker.engine.hooks import NO_HOOKS, Hooks

    faults = parse_faults(value)
    if not faults:
        return NO_HOOKS

    # torch.distributed.run gives each rank its RANK; a one-device run has none (rank 0).
    spared = "oom_rank" in faults and int(os.environ.get("RANK", "0")) != faults["oom_rank"]

    def out_of_memory_above(fault: str) -> BatchHook | None:
        if fault not in faults or spared:
            return None

        def inject(size: int, _batch: Batch) -> None:
            if size > faults[fault]:
                raise torch.OutOfMemoryError(f"injected by TRAINJOB_TEST_FAULTS ({fault}, {size})")

        return inject

    def out_of_memory_in_step() -> None:
        raise torch.OutOfMemoryError("injected by TRAINJOB_TEST_FAULTS (oom_step)")

    forward_out_of_memory = out_of_memory_above("oom")

    def before_forward(size: int, batch: Batch) -> None:
        if "slow" in faults:  # a pace that tests can interrupt mid-job; weights unchanged
            time.sleep(faults["slow"])
        if forward_out_of_memory is not None:
            forward_out_of_memory(size, batch)
        if "nan" in faults and batch.inputs.is_floating_point():
            batch.inputs.fill_(float("nan"))

    return Hooks(
        before_forward=before_forward,
        in_backward=out_of_memory_above("oom_backward"),
        before_step=out_of_memory_in_step if "oom_step" in faults else None,
        before_evaluation=out_of_memory_above("oom_eval"),
    )
