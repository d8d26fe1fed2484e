"""Dispatch through the embedded service: submit -> claim -> first optimizer step.

Not part of CI by itself (bench/gpu.py runs it, and its dry run is: tests/bench/
test_gpu_kit.py). It starts `trainjob serve` on embedded defaults in a fresh
TRAINJOB_HOME (SQLite, a private Redis, the API and one worker: no PostgreSQL, no Redis
server needed), waits until the dashboard lists a live worker on `--device` (on a GPU
machine the worker announces `cuda` from the driver, which is what lets a job with
`device: "cuda"` in without TRAINJOB_ALLOW_UNSEEN_CUDA) and until its pool child has
loaded the engine, then submits `--jobs` small tiny-gpt jobs one at a time, each once
the previous one has finished and a fresh pool child is ready (bench/api.py's
`child_ready`). For each job:

- claim: `started_at - created_at` (the API's insert to the worker's claim);
- first step: the first metric's `time` (the worker's clock when the first optimizer
  step ended) `- created_at`: everything a user waits for before training shows,
  the pool child's CUDA initialisation included.

Both clocks are this machine's. The exit status is 1 when a job did not succeed, 2 when
the service did not start.

    .venv/bin/python bench/dispatch.py                          # CPU, 3 jobs, about 20 s
    .venv/bin/python bench/dispatch.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from api import child_ready, preloads

# Run as `python bench/dispatch.py`: the checkout's root is not on sys.path, and the
# process helpers are the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.processes import (
    TRAINJOB,
    ProcessFailed,
    free_port,
    service_env,
    stop_group,
    wait_for_status,
    wait_until_ready,
    wait_while_running,
)
from worker.parent_death import dies_with

FINISHED = {"succeeded", "failed", "cancelled"}


def job_spec(device: str, precision: str) -> dict[str, Any]:
    """A job that is quick anywhere: the README's tiny-gpt, three steps of m=4, k=2."""
    return {
        "name": "bench dispatch",
        "model": {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        "dataset": {"type": "tiny-text"},
        "micro_batch_size": 4,
        "accumulation_steps": 2,
        "max_steps": 3,
        "precision": precision,
        "device": device,
    }


def milliseconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds() * 1e3


def worker_on(client: httpx.Client, device: str) -> bool:
    response = client.get("/v1/dashboard")
    return response.status_code == 200 and any(
        worker["device"] == device for worker in response.json()["workers"]
    )


def measure(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    port = free_port()
    env = service_env(home=str(logs / "home"))
    log = logs / "serve.log"
    with log.open("wb") as output:
        # A group of its own (stop_group stops the API, the worker and Redis in order),
        # and SIGKILLed should we die first: a killed benchmark leaves no service behind.
        serve = subprocess.Popen(
            [*TRAINJOB, "serve", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=dies_with(os.getpid(), signal.SIGKILL),
        )
    url = f"http://127.0.0.1:{port}"
    jobs: list[dict[str, Any]] = []
    try:
        wait_until_ready(url, serve, log, timeout=args.ready_timeout)
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_while_running(
                serve,
                log,
                lambda: worker_on(client, args.device),
                args.ready_timeout,
                f"a worker on {args.device} in the dashboard",
            )
            for _ in range(args.jobs):
                # Idle: after each job the pool forks a fresh child, which loads the engine.
                idle = functools.partial(child_ready, log)
                wait_while_running(serve, log, idle, args.ready_timeout, "an idle pool child")
                submitted = client.post("/v1/jobs", json=job_spec(args.device, args.precision))
                if submitted.status_code != 201:
                    answer = f"{submitted.status_code}: {submitted.text}"
                    raise ProcessFailed(f"submit answered {answer}")
                job_id = submitted.json()["id"]
                job = wait_for_status(client, job_id, FINISHED, timeout=args.job_timeout)
                metrics = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1}).json()
                first = metrics["data"][0]["time"] if metrics["data"] else None
                jobs.append(
                    {
                        "id": job_id,
                        "status": job["status"],
                        "error": job["error"],
                        "claim_ms": (
                            milliseconds(job["started_at"], job["created_at"])
                            if job["started_at"]
                            else None
                        ),
                        "first_step_ms": milliseconds(first, job["created_at"]) if first else None,
                    }
                )
    finally:
        stop_group(serve)
    loaded = [seconds for seconds, _ in preloads(log)]
    return {"device": args.device, "precision": args.precision, "jobs": jobs, "preloads": loaded}


def summary(figures: dict[str, Any]) -> list[str]:
    jobs = figures["jobs"]
    lines = [
        f"{len(jobs)} jobs on {figures['device']} ({figures['precision']}), one at a time, "
        "each on an idle worker (a fresh pool child with the engine loaded)"
    ]
    for job in jobs:
        claim, first = job["claim_ms"], job["first_step_ms"]
        lines.append(
            f"  {job['id']}: {job['status']}, submit -> claim "
            + (f"{claim:,.0f} ms" if claim is not None else "-")
            + ", submit -> first optimizer step "
            + (f"{first:,.0f} ms" if first is not None else "-")
            + (f" ({job['error']['type']}: {job['error']['message']})" if job["error"] else "")
        )
    for name, key in (("claim", "claim_ms"), ("first optimizer step", "first_step_ms")):
        values = [job[key] for job in jobs if job[key] is not None]
        if values:
            lines.append(f"submit -> {name}: median {statistics.median(values):,.0f} ms")
    if figures["preloads"]:
        lines.append(
            f"a pool child loads the engine in {statistics.median(figures['preloads']):.2f} s "
            "(median; before it takes a job, not counted above)"
        )
    return lines


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--ready-timeout", type=float, default=90, help="seconds")
    parser.add_argument("--job-timeout", type=float, default=120, help="seconds")
    parser.add_argument("--keep-logs", type=Path, help="the service's home and log here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def stop_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (bench/gpu.py's timeout) unwinds like Ctrl-C: the finally stops the service.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as folder:
        logs = args.keep_logs or Path(folder)
        logs.mkdir(parents=True, exist_ok=True)
        try:
            figures = measure(args, logs)
        except (ProcessFailed, TimeoutError) as error:
            print(f"FAILED: {error}", file=sys.stderr)
            return 2
    print("\n".join(summary(figures)))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    succeeded = all(job["status"] == "succeeded" for job in figures["jobs"])
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
