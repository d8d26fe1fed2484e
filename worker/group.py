"""A job on several devices: its ranks, started by PyTorch's own launcher.

Celery's prefork pool children are daemonic, and a daemonic process may not start
multiprocessing children (celery#1709), which is how an in-process `elastic_launch`
would start the ranks. So the pool child that claimed the job starts the launcher as a
plain subprocess, `python -m torch.distributed.run --standalone --nproc-per-node N
--max-restarts 0 -m worker.rank ...`, a process of its own that may have children, and
waits for it.

Who does what:
- the pool child: the claim (before), starting the launcher and waiting, recording the
  outcome (after), as for any job;
- rank 0 (worker/rank.py): what the pool child does for a one-device job while it
  trains: lease heartbeats, progress, events, checkpoints, cancel and shutdown requests
  (the same LeaseKeeper and ProgressWriter), then the outcome, into a file;
- the other ranks: their share of each window; they report nothing.

A rank that dies makes the launcher stop the others (within its monitor interval) and
exit non-zero; the survivors' collectives fail at once (gloo) or after the collective
timeout (NCCL). No outcome then: the job goes back to the queue `rank_failed`, a counted
retry from its checkpoint (max_restarts 0: retries are the service's). Nothing outlives
its parent: the launcher gets SIGTERM when the pool child dies (and stops its ranks), a
rank SIGKILL when the launcher dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.devices import WorkerDevices
from worker.parent_death import dies_with

logger = logging.getLogger(__name__)

# How often the launcher checks its ranks: a dead rank ends the group this soon.
MONITOR_INTERVAL_SECONDS = 0.5


@dataclass(frozen=True)
class GroupResult:
    exit_code: int
    outcome: dict[str, Any] | None  # what rank 0 wrote; None if it wrote nothing


def launcher_command(devices: int, module: str, rank_arguments: list[str]) -> list[str]:
    """torch.distributed.run starting `devices` ranks of `python -m module ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous of this machine's ranks, on a free port
        f"--nproc-per-node={devices}",
        "--max-restarts=0",
        f"--monitor-interval={MONITOR_INTERVAL_SECONDS}",
        "-m",
        module,
        *rank_arguments,
    ]


def launch_environment(devices: int) -> dict[str, str]:
    """The launcher's environment: each CPU rank a fair share of the cores, unless the
    operator set OMP_NUM_THREADS (torch.distributed.run would set 1 and say so)."""
    threads = str(max(1, (os.cpu_count() or 1) // devices))
    return {"OMP_NUM_THREADS": threads, **os.environ}


def run_group(
    job_id: str, claim: dict[str, Any], devices: int, owned: WorkerDevices
) -> GroupResult:
    """Train the claimed job on `devices` of the worker's devices; blocks until the group
    ends. `claim` is what rank 0 needs to act as the run's owner."""
    with tempfile.TemporaryDirectory(prefix="trainjob-group-") as directory:
        outcome_path = Path(directory) / "outcome.json"
        rank_arguments = [job_id, json.dumps(claim), str(outcome_path)]
        command = launcher_command(devices, "worker.rank", rank_arguments)
        environment = {**launch_environment(devices), **owned.environment(devices)}
        if owned.kind == "cpu":
            environment["TRAINJOB_RANK_DEVICE"] = "cpu"
        logger.info("job %s: starting %d ranks on %s", job_id, devices, owned.describe())
        process = subprocess.Popen(
            command,
            env=environment,
            preexec_fn=dies_with(os.getpid(), signal.SIGTERM),
            # Out of the worker's process group: a Ctrl-C at the worker's terminal is the
            # worker's graceful shutdown (rank 0 hears it through the lease), not a signal
            # that would kill the ranks mid-window.
            start_new_session=True,
        )
        exit_code = process.wait()
        outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else None
    return GroupResult(exit_code, outcome)


def write_outcome(path: Path, outcome: dict[str, Any]) -> None:
    """Atomically: the pool child reads a whole outcome or none."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(outcome))
    partial.replace(path)
