"""The devices a worker owns (`trainjob worker --devices`, TRAINJOB_WORKER_DEVICES).

`0,1,2,3` names CUDA devices by index; `cpu:4` asks for four CPU processes (tests and
CPU-only machines); unset: every visible CUDA device, else one CPU device. A worker runs
one job at a time on the first `devices` of them. Importing this module imports no torch:
the worker's main process never does (it forks the pool's children).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_CPU = re.compile(r"^cpu:([1-9][0-9]*)$")
_CUDA = re.compile(r"^[0-9]+(,[0-9]+)*$")


@dataclass(frozen=True)
class WorkerDevices:
    kind: str  # "cuda" or "cpu"
    ids: tuple[str, ...]  # CUDA indices; for CPU, "0".."n-1"

    @property
    def count(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        return f"cpu:{self.count}" if self.kind == "cpu" else ",".join(self.ids)

    def environment(self, devices: int) -> dict[str, str]:
        """What a job on `devices` of them runs with: CUDA sees only its devices."""
        if self.kind == "cuda":
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.ids[:devices])}
        return {}


def parse_devices(value: str) -> WorkerDevices:
    """`0,1,2,3` or `cpu:4`; ValueError saying what is accepted otherwise."""
    text = value.strip()
    if match := _CPU.match(text):
        return WorkerDevices("cpu", tuple(str(index) for index in range(int(match[1]))))
    if _CUDA.match(text):
        ids = tuple(text.split(","))
        if len(set(ids)) != len(ids):
            raise ValueError(f"devices {value!r} names a device twice")
        return WorkerDevices("cuda", ids)
    raise ValueError(
        f"devices {value!r}: give CUDA device indices (e.g. 0,1,2,3) or cpu:N (e.g. cpu:4)"
    )


def visible_cuda_devices() -> int:
    """How many CUDA devices torch sees, asked in a child process: the worker's main
    process must not import torch or initialise CUDA before it forks."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
        )
        return int(result.stdout.strip() or 0)
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def worker_devices(value: str | None) -> WorkerDevices:
    """The declared devices, or the default: every visible CUDA device, else one CPU."""
    if value:
        return parse_devices(value)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    # No NVIDIA device nodes: no CUDA, and no second or two spent importing torch to see.
    count = visible_cuda_devices() if any(Path("/dev").glob("nvidia[0-9]*")) else 0
    if count == 0:
        return WorkerDevices("cpu", ("0",))
    if visible:  # indices as CUDA_VISIBLE_DEVICES names them, so a job's subset is right
        return WorkerDevices("cuda", tuple(visible.split(","))[:count])
    return WorkerDevices("cuda", tuple(str(index) for index in range(count)))
