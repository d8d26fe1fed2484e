"""Faults a worker injects on purpose (TRAINJOB_TEST_FAULTS), for testing only.

`nan` fills every input with NaN, `oom` raises out-of-memory at every micro-batch,
`slow=SECONDS` sleeps that long per micro-batch. They go through the engine's
micro-batch hook, the same path the engine's own tests
use, so a worker process can be shown to fail `nan_loss` or `out_of_memory` without
a GPU and without a spec that diverges.

`kill_validation` makes a file's validation SIGKILL its own process, as the OOM killer
would (worker/datafiles/runner.py). torch is imported only by the training hook: the
validation task reads these faults too, and never imports torch.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine.data_types import Batch
    from worker.engine.window import MicroBatchHook

KNOWN_FAULTS = frozenset({"nan", "oom", "slow", "kill_validation"})


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


def fault_hook(value: str | None) -> MicroBatchHook | None:
    faults = parse_faults(value)
    if not faults:
        return None
    import torch  # here, not at the top: the validation task imports this module

    def inject(size: int, batch: Batch) -> None:
        if "slow" in faults:  # a pace that tests can interrupt mid-job; weights unchanged
            time.sleep(faults["slow"])
        if "oom" in faults:
            raise torch.OutOfMemoryError(f"injected by TRAINJOB_TEST_FAULTS (micro-batch {size})")
        if "nan" in faults and batch.inputs.is_floating_point():
            batch.inputs.fill_(float("nan"))

    return inject
