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

A job on several nodes (app/jobs/gangs.py) runs one launcher per node, each started by
the pool child that holds the node's slot, meeting at the leader's rendezvous instead
of `--standalone`: `--nnodes N --rdzv-backend c10d --rdzv-endpoint ADDR:PORT --rdzv-id
JOB-LEASE --rdzv-conf is_host=true|false,... --local-addr TRAINJOB_WORKER_ADDRESS`.
torch's c10d rendezvous numbers the nodes by their sorted (address, pid) descriptors
(dynamic_rendezvous.py `_mark_rendezvous_complete`), and the agents give global ranks in
node order, so global rank 0 may be on any node: whichever it is does rank 0's part, with
the run's claim (the leader's), and writes the outcome on its own node (a follower
passes it on in its slot). `watch`, polled while the launcher runs, stops it when the
run is no longer this node's (a void slot, a lost node, a gang that did not form).

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
import time
from collections.abc import Callable
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


# A launcher asked to stop has this long to stop its ranks before it is killed.
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Rendezvous:
    """Where the launchers of a multi-node job meet: the leader's slot (app/jobs/gangs.py)."""

    nodes: int
    address: str  # the leader's TRAINJOB_WORKER_ADDRESS
    port: int
    run_id: str  # the job and its lease: a new run never meets an old one's nodes
    is_host: bool  # the leader hosts the rendezvous store
    local_address: str  # this node's TRAINJOB_WORKER_ADDRESS
    # How long the launchers wait for each other (the gang's bounded wait).
    join_timeout_seconds: float

    def arguments(self) -> list[str]:
        timeout = max(1, round(self.join_timeout_seconds))
        settings = [
            f"is_host={str(self.is_host).lower()}",
            f"join_timeout={timeout}",
            # A follower may start before the leader's store listens: it waits this long.
            f"read_timeout={timeout + 30}",
        ]
        return [
            f"--nnodes={self.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.address}:{self.port}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={','.join(settings)}",
            f"--local-addr={self.local_address}",
        ]


def launcher_command(
    devices: int, module: str, rank_arguments: list[str], rendezvous: Rendezvous | None = None
) -> list[str]:
    """torch.distributed.run starting `devices` ranks of `python -m module ARGS`, on this
    machine alone or as one node of `rendezvous`."""
    # Without a rendezvous: one of this machine's ranks, on a free port.
    meeting = ["--standalone"] if rendezvous is None else rendezvous.arguments()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *meeting,
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
    job_id: str,
    claim: dict[str, Any],
    devices: int,
    owned: WorkerDevices,
    *,
    rendezvous: Rendezvous | None = None,
    watch: Callable[[], str | None] | None = None,
    watch_seconds: float = 1.0,
) -> GroupResult:
    """Train the claimed job on `devices` of the worker's devices (as one node of
    `rendezvous`, if given); blocks until the group ends. `claim` is what rank 0 needs to
    act as the run's owner. `watch`, every `watch_seconds`: a reason to stop the group
    now, or None."""
    with tempfile.TemporaryDirectory(prefix="trainjob-group-") as directory:
        outcome_path = Path(directory) / "outcome.json"
        rank_arguments = [job_id, json.dumps(claim), str(outcome_path)]
        command = launcher_command(devices, "worker.rank", rank_arguments, rendezvous)
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
        exit_code = _wait(process, watch, watch_seconds, job_id)
        outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else None
    return GroupResult(exit_code, outcome)


def _wait(
    process: subprocess.Popen[bytes],
    watch: Callable[[], str | None] | None,
    watch_seconds: float,
    job_id: str,
) -> int:
    """The launcher's exit code, once it exits or `watch` has it stopped."""
    if watch is None:
        return process.wait()
    while True:
        try:
            return process.wait(timeout=watch_seconds)
        except subprocess.TimeoutExpired:
            pass
        try:
            reason = watch()
        except Exception:  # a database blip: the next look decides
            logger.warning("job %s: could not check on the group", job_id, exc_info=True)
            continue
        if reason is not None:
            logger.warning("job %s: stopping the group: %s", job_id, reason)
            return stop_launcher(process)


def stop_launcher(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the launcher stops its ranks), then SIGKILL after STOP_GRACE_SECONDS
    (its ranks die with it, worker/rank.py)."""
    process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    try:
        return process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def write_outcome(path: Path, outcome: dict[str, Any]) -> None:
    """Atomically: the pool child reads a whole outcome or none."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(outcome))
    partial.replace(path)
