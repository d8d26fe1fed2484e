"""Chaos: jobs through worker processes that are SIGKILLed and restarted at random.

Not part of CI. It starts, on this machine, an API process (`trainjob serve
--no-worker`, which runs the reaper) and `--workers` worker processes on a fresh
PostgreSQL database and a queue of their own, submits `--jobs` small jobs (half at
once, the others one every `--submit-interval` seconds), and while they train a killer
SIGKILLs a random worker's whole process group (the Celery parent and its training
child) every `--kill-interval` seconds on average (exponentially distributed) and
starts a fresh worker in its place, until every job has finished,
`--timeout` passes, or no job has moved for `--stall-timeout` seconds; in the last two
cases it then waits up to `--grace` seconds without kills for the jobs left. Timings
are shortened (heartbeat 0.2 s, lease 2 s, reaper every 0.5 s) and the workers inject
`slow=SECONDS` (a pause per micro-batch that leaves the weights alone) so that jobs
last a few seconds and are killed mid-run. Each job gets a random priority (one of
`PRIORITIES`, seeded), and preemption is on (TRAINJOB_PREEMPT_GAP `--preempt-gap`,
TRAINJOB_MIN_RUN_SECONDS 0): a job waiting behind a running one of much lower priority
has it hand back its worker at its next optimizer step, so runs also end `preempted`.

It then prints, from the API:

* submitted, succeeded, failed (by error type);
* lost: submitted jobs that did not end `succeeded` (failed, cancelled or never
  finished) - must be 0;
* overlap: jobs two of whose runs (GET /v1/jobs/{id}/attempts, [started_at,
  ended_at), an open run lasting to the end) overlap in time - must be 0;
* weights differ: succeeded jobs whose final weights differ byte for byte from an
  undisturbed `trainjob run` of the same spec (a 2-node job: by more than 1e-10, see
  below) - must be 0;

and kills, runs per job, the reasons runs ended, what the worker logs say about fenced
runs and refused duplicate deliveries, the messages killed workers left in kombu's
`unacked` hash, where the messages of each lost job are, and the wall time. The exit
status is 1 when lost, overlap or weights differ is not 0, 2 when the cluster could
not be set up, and 130 on Ctrl-C. All processes, the run's Redis keys and the
temporary database are removed at the end, Ctrl-C included.

    .venv/bin/python bench/chaos.py                     # 30 jobs, 2 workers
    .venv/bin/python bench/chaos.py --preempt-gap 1001  # no preemption (all priorities 500)
    .venv/bin/python bench/chaos.py --jobs 6 --keep-logs /tmp/chaos-logs
    .venv/bin/python bench/chaos.py --multi-node        # a third of the jobs on 2 nodes

`--multi-node`: every third job is a 2-node job (`"nodes": 2`, fp64), and each worker
is a node of its own (`TRAINJOB_WORKER_DEVICES=cpu:1`, `TRAINJOB_WORKER_ADDRESS`
127.0.0.1, .2, ...; 3 workers unless `--workers` says otherwise), so that a gang takes
two of them and a kill may hit a gang's leader or a follower. A 2-node job's weights are
compared with one process training the same global batch (k twice as large) within a
relative 1e-10, not byte for byte: the gradient sum over two ranks rounds differently.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg
import redis

from app.db import upgrade

# Run as `python bench/chaos.py`: the checkout's root is not on sys.path, and the
# process helpers are the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.processes import (
    API,
    FAST_TIMINGS,
    RESUMABLE_SPEC,
    TRAINJOB,
    Server,
    kill_group,
    launch,
    service_env,
    start,
    start_training,
    stop_group,
    tail,
    trained_weights,
    wait_until_ready,
)

FINISHED = frozenset({"succeeded", "failed", "cancelled"})
# Submitted round robin; each variant's reference weights are computed once.
VARIANTS: list[dict[str, Any]] = [
    RESUMABLE_SPEC,
    RESUMABLE_SPEC
    | {
        "micro_batch_size": 4,
        "accumulation_steps": 4,
        "max_steps": 30,
        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
        "lr_schedule": {"type": "linear", "warmup_steps": 3},
        "seed": 7,
    },
    RESUMABLE_SPEC
    | {
        "model": {"type": "mlp", "hidden_sizes": [32, 16], "dropout": 0.1},
        "micro_batch_size": 6,
        "accumulation_steps": 3,
        "max_steps": 40,
        "grad_clip_norm": 1.0,
        "seed": 11,
    },
]


# --multi-node: replaces the third variant; its reference is one process with the same
# global batch (m · k · nodes), which it equals within MULTI_NODE_TOLERANCE in fp64.
MULTI_NODE_VARIANT: dict[str, Any] = RESUMABLE_SPEC | {
    "nodes": 2,
    "precision": "fp64",
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 30,
    "seed": 5,
}
MULTI_NODE_TOLERANCE = 1e-10


def variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [*VARIANTS[:2], MULTI_NODE_VARIANT] if args.multi_node else VARIANTS


def one_process(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec on one process: the same global batch, k times the nodes."""
    nodes = spec.get("nodes", 1)
    single = {key: value for key, value in spec.items() if key not in ("nodes", "elastic")}
    return single | {"accumulation_steps": spec["accumulation_steps"] * nodes}


def same_weights(got: bytes | None, reference: bytes, spec: dict[str, Any]) -> bool:
    """Byte for byte on one node; within MULTI_NODE_TOLERANCE (relative to the largest
    weight of each tensor) on several."""
    if got is None:
        return False
    if spec.get("nodes", 1) == 1:
        return got == reference
    from safetensors.numpy import load  # only for --multi-node

    ours, theirs = load(got), load(reference)
    if ours.keys() != theirs.keys():
        return False
    for name, value in ours.items():
        scale = max(float(abs(theirs[name]).max()), 1e-300)
        if float(abs(value - theirs[name]).max()) > MULTI_NODE_TOLERANCE * scale:
            return False
    return True


# Drawn at random for each job (seeded): gaps of 200 or more preempt at the default gap.
PRIORITIES = (100, 300, 500, 700, 900)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop and clean up."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="N jobs through worker processes that a killer SIGKILLs and restarts at "
        "random; checks that no job is lost, none is trained by two workers at once, and "
        "every job ends at the weights of an undisturbed run.",
    )
    parser.add_argument("--jobs", type=int, default=30, help="jobs to submit (30)")
    parser.add_argument("--workers", type=int, help="worker processes (2; 3 with --multi-node)")
    parser.add_argument(
        "--multi-node",
        action="store_true",
        help="every third job on 2 nodes; each worker a node of its own (cpu:1, its own "
        "TRAINJOB_WORKER_ADDRESS)",
    )
    parser.add_argument(
        "--kill-interval",
        type=float,
        default=4.0,
        metavar="SECONDS",
        help="mean seconds between kills, exponentially distributed (4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the killer's RNG (0)")
    parser.add_argument(
        "--slow",
        type=float,
        default=0.01,
        metavar="SECONDS",
        help="the workers' injected pause per micro-batch (TRAINJOB_TEST_FAULTS=slow=...; 0.01)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=10,
        help="max_attempts of each job spec (1..10; 10, the most the API accepts: a job "
        "killed that often fails worker_lost by design and would count as lost)",
    )
    parser.add_argument(
        "--submit-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="half the jobs are submitted at the start, the others one every SECONDS (2)",
    )
    parser.add_argument(
        "--preempt-gap",
        type=int,
        default=100,
        help="TRAINJOB_PREEMPT_GAP of the run (100; over 1000: no preemption, and every job "
        "gets the default priority, as before priorities existed)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="give up waiting for the jobs after this long (900)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="stop the killer when no job has changed status, step or attempts for this long (120)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="when the killer stopped on --timeout or --stall-timeout, wait up to this long "
        "without kills for the jobs left (60)",
    )
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the database to use (migrated to head; kept). Default: a "
        "fresh database trainjob_chaos_<hex> on --postgres-admin, dropped at the end",
    )
    parser.add_argument(
        "--postgres-admin",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="libpq URL to create and drop the temporary database with (%(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="broker (%(default)s); the run uses a queue of its own, removed at the end",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="write the API, worker and reference logs here and keep them (default: a "
        "temporary directory, kept only when the run fails)",
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 3 if args.multi_node else 2
    if args.jobs < 1 or args.workers < 1:
        parser.error("--jobs and --workers must be at least 1")
    if args.kill_interval <= 0:
        parser.error("--kill-interval must be > 0")
    if not 1 <= args.max_attempts <= 10:
        parser.error("--max-attempts must be in 1..10")
    if args.preempt_gap < 1:
        parser.error("--preempt-gap must be at least 1")
    if args.multi_node and args.workers < MULTI_NODE_VARIANT["nodes"]:
        parser.error("--multi-node needs at least 2 workers")
    return args


def say(message: str) -> None:
    print(message, flush=True)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------- resources


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    """The run's database URL: --database-url, or a fresh database dropped afterwards."""
    if args.database_url:
        upgrade(args.database_url)
        yield args.database_url
        return
    name = f"trainjob_chaos_{secrets.token_hex(6)}"
    with psycopg.connect(args.postgres_admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        base = args.postgres_admin.rsplit("/", 1)[0] + "/" + name
        url = base.replace("postgresql://", "postgresql+psycopg://", 1)
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(args.postgres_admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def clear_queue(redis_url: str, queue: str) -> int:
    """Remove the run's queue from Redis, and the messages SIGKILLed workers left in
    kombu's `unacked` hash (they would be redelivered only after the visibility timeout,
    to a queue nobody reads). Returns how many unacked messages were removed."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        keys += [key for key in client.scan_iter(match=f"{queue}\x06\x16*")]
        client.delete(*keys)
        removed = 0
        for tag, raw in client.hscan_iter("unacked"):
            try:
                _message, exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if queue in (exchange, routing_key):
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
                removed += 1
        return removed
    finally:
        client.close()


def compute_references(workdir: Path, specs: list[dict[str, Any]]) -> list[bytes]:
    """Each variant's final weights from an undisturbed `trainjob run` on one process
    (in parallel)."""
    folders = [workdir / f"reference-{index}" for index in range(len(specs))]
    runs = [
        start_training(one_process(spec), folder)
        for spec, folder in zip(specs, folders, strict=True)
    ]
    try:
        return [trained_weights(run, folder) for run, folder in zip(runs, folders, strict=True)]
    finally:
        for run in runs:
            kill_group(run)


# --------------------------------------------------------------------------- the cluster


@dataclass
class Slot:
    """One worker position; a kill replaces its process with a fresh one."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started: int = 0

    @property
    def node(self) -> str:
        """The Celery node name `trainjob worker` gives itself (cli/serve.py)."""
        assert self.process is not None
        return f"trainjob-{self.process.pid}@{socket.gethostname()}"


@dataclass
class Cluster:
    env: dict[str, str]
    logs: Path
    slow: float
    # --multi-node: each worker a node of its own, at 127.0.0.<slot + 1>.
    nodes: bool = False
    api: Server | None = None
    client: httpx.Client | None = None
    slots: list[Slot] = field(default_factory=list)

    @property
    def http(self) -> httpx.Client:
        assert self.client is not None
        return self.client

    def start_api(self) -> None:
        log = self.logs / "api.log"
        self.api = launch(API, self.env, log)
        wait_until_ready(self.api.url, self.api.process, log, timeout=90)
        self.client = httpx.Client(base_url=self.api.url, timeout=30)

    def start_worker(self, slot: Slot) -> None:
        slot.started += 1
        log = self.logs / f"worker-{slot.index}-{slot.started:03d}.log"
        env = self.env | ({"TRAINJOB_TEST_FAULTS": f"slow={self.slow:g}"} if self.slow else {})
        if self.nodes:
            env |= {
                "TRAINJOB_WORKER_DEVICES": "cpu:1",
                "TRAINJOB_WORKER_ADDRESS": f"127.0.0.{slot.index + 1}",
            }
        slot.process = start([*TRAINJOB, "worker"], env, log)

    def start_workers(self, count: int) -> None:
        for index in range(count):
            slot = Slot(index)
            self.slots.append(slot)
            self.start_worker(slot)

    def stop(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                kill_group(slot.process)
        if self.client is not None:
            self.client.close()
        if self.api is not None:
            stop_group(self.api.process)

    # ------------------------------------------------------------------- the API

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.http.post("/v1/jobs", json=spec)
        if response.status_code != 201:
            raise RuntimeError(f"submit: {response.status_code} {response.text}")
        job_id: str = response.json()["id"]
        return job_id

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100} | ({"status": status} if status else {})
        while True:
            page = self.http.get("/v1/jobs", params=params).json()
            found += page["data"]
            if not page["has_more"]:
                return found
            params["after"] = page["data"][-1]["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}").json()
        return job

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self.http.get(f"/v1/jobs/{job_id}/attempts", params=params).json()
            found += page["data"]
            if not page["has_more"]:
                return found
            params["after"] = page["data"][-1]["attempt"]

    def weights(self, job_id: str) -> bytes | None:
        response = self.http.get(f"/v1/jobs/{job_id}/weights")
        return response.content if response.status_code == 200 else None


# --------------------------------------------------------------------------- chaos


@dataclass
class Chaos:
    kills: int = 0
    kills_mid_job: int = 0
    unexpected_exits: int = 0
    ended: str = ""  # why the killer stopped: all finished, timeout, stalled
    seconds: float = 0.0  # the killer's phase
    calm_seconds: float = 0.0  # the calm period after it, when it stopped early
    finished_in_calm: int = 0


def keep_workers_up(cluster: Cluster, chaos: Chaos) -> None:
    """Replace a worker that exited by itself (and note it)."""
    for slot in cluster.slots:
        assert slot.process is not None
        if slot.process.poll() is None:
            continue
        chaos.unexpected_exits += 1
        say(f"  worker {slot.index} exited by itself ({slot.process.returncode})")
        kill_group(slot.process)
        if chaos.unexpected_exits > 5 * len(cluster.slots):
            log = cluster.logs / f"worker-{slot.index}-{slot.started:03d}.log"
            raise RuntimeError(f"workers keep exiting:\n{tail(log)}")
        cluster.start_worker(slot)


def kill_one(cluster: Cluster, chaos: Chaos, rng: random.Random, ours: set[str]) -> None:
    """SIGKILL a random worker's process group (parent and training child) and start a
    fresh worker in its place."""
    slot = rng.choice(cluster.slots)
    assert slot.process is not None
    running = {j["worker"]: j for j in cluster.jobs("running") if j["id"] in ours}
    victim = running.get(slot.node)
    chaos.kills += 1
    chaos.kills_mid_job += victim is not None
    kill_group(slot.process)
    with (cluster.logs / "kills.log").open("a") as kills:
        what = f"{victim['id']} at step {victim['progress']['step']}" if victim else "no run"
        kills.write(f"{datetime.now(UTC):%H:%M:%S.%f} {slot.node}: {what}\n")
    cluster.start_worker(slot)


@dataclass
class Submitter:
    """Submits the jobs: the first half at once, then one every `interval` seconds while
    the others run, so that a job of high priority may arrive while lower ones run."""

    cluster: Cluster
    pending: list[dict[str, Any]]
    interval: float
    job_ids: list[str] = field(default_factory=list)
    next_at: float = 0.0

    def start(self) -> None:
        for _ in range((len(self.pending) + 1) // 2):
            self.job_ids.append(self.cluster.submit(self.pending.pop(0)))
        self.next_at = time.monotonic() + self.interval

    def submit_due(self, now: float) -> None:
        if self.pending and now >= self.next_at:
            self.job_ids.append(self.cluster.submit(self.pending.pop(0)))
            self.next_at = now + self.interval


def watch(
    cluster: Cluster,
    chaos: Chaos,
    submitter: Submitter,
    *,
    limit: float,
    stall: float,
    rng: random.Random | None = None,
    interval: float = 0.0,
) -> tuple[str, int]:
    """Poll the jobs until all have finished, `limit` seconds pass, or no job changes
    (status, step, attempts) for `stall` seconds; with `rng`, kill a random worker every
    `interval` seconds on average meanwhile. Returns why it stopped and how many jobs
    finished while it watched."""
    began = last_change = time.monotonic()
    next_kill = began + rng.expovariate(1 / interval) if rng else float("inf")
    next_report = began + 15
    snapshot: list[tuple[str, str, int, int]] = []
    done_before: int | None = None
    while True:
        now = time.monotonic()
        submitter.submit_due(now)
        ours = set(submitter.job_ids)
        jobs = [j for j in cluster.jobs() if j["id"] in ours]
        statuses = Counter(j["status"] for j in jobs)
        done = sum(statuses[s] for s in FINISHED)
        done_before = done if done_before is None else done_before
        state = sorted((j["id"], j["status"], j["progress"]["step"], j["attempts"]) for j in jobs)
        if state != snapshot:
            snapshot, last_change = state, now
        if done == len(ours) and not submitter.pending:
            return "all finished", done - done_before
        if now - began > limit:
            return "timeout", done - done_before
        if now - last_change > stall:
            return "stalled", done - done_before
        if now >= next_report:
            say(
                f"  {now - began:5.0f} s: {done}/{len(ours)} finished "
                f"({statuses['succeeded']} succeeded, {statuses['running']} running, "
                f"{statuses['queued']} queued), {chaos.kills} kills"
            )
            next_report += 15
        keep_workers_up(cluster, chaos)
        if rng is not None and now >= next_kill:
            kill_one(cluster, chaos, rng, ours)
            next_kill = time.monotonic() + rng.expovariate(1 / interval)
        wake_at = min(next_kill, submitter.next_at if submitter.pending else next_kill)
        time.sleep(max(0.0, min(0.5, wake_at - time.monotonic())))


def run_chaos(cluster: Cluster, submitter: Submitter, args: argparse.Namespace) -> Chaos:
    chaos = Chaos()
    began = time.monotonic()
    chaos.ended, _ = watch(
        cluster,
        chaos,
        submitter,
        limit=args.timeout,
        stall=args.stall_timeout,
        rng=random.Random(args.seed),
        interval=args.kill_interval,
    )
    chaos.seconds = time.monotonic() - began
    if chaos.ended != "all finished" and args.grace > 0:
        say(f"the killer stops ({chaos.ended}); up to {args.grace:g} s more without kills")
        began = time.monotonic()
        _, chaos.finished_in_calm = watch(
            cluster, chaos, submitter, limit=args.grace, stall=args.grace
        )
        chaos.calm_seconds = time.monotonic() - began
    return chaos


# --------------------------------------------------------------------------- findings


@dataclass
class Findings:
    submitted: int = 0
    succeeded: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    overlapping: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    compared: int = 0
    counted_attempts: list[int] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    # For each lost job: its status, attempts, step, and where its messages are.
    lost_detail: dict[str, str] = field(default_factory=dict)
    unacked_removed: int = 0


def overlaps(runs: list[dict[str, Any]]) -> bool:
    """Whether two runs' [started_at, ended_at) intervals intersect (an open run: to the end)."""
    end_of_time = datetime.max.replace(tzinfo=UTC)
    spans = [
        (parse_time(r["started_at"]), parse_time(r["ended_at"]) if r["ended_at"] else end_of_time)
        for r in runs
    ]
    return any(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in itertools.combinations(spans, 2))


def _job_of(message: Any) -> str:
    """The job id of a Celery message (its task id is `JOB_ID:SUFFIX`)."""
    if isinstance(message, bytes | str):
        message = json.loads(message)
    return str(message["headers"]["id"]).split(":", 1)[0]


def broker_messages(redis_url: str, queue: str) -> dict[str, list[str]]:
    """Job id → where its messages are in Redis: the queue list, or kombu's `unacked`
    hash (delivered to a worker, not acknowledged) and for how long."""
    client = redis.Redis.from_url(redis_url)
    places: dict[str, list[str]] = {}
    try:
        for raw in client.lrange(queue, 0, -1):
            places.setdefault(_job_of(raw), []).append("in the queue")
        now = time.time()
        for tag, raw in client.hscan_iter("unacked"):
            try:
                message, exchange, routing_key = json.loads(raw)
                job_id = _job_of(message)
            except (ValueError, TypeError, KeyError):
                continue
            if queue in (exchange, routing_key):
                since = client.zscore("unacked_index", tag)
                age = f" for {now - since:.0f} s" if since else ""
                places.setdefault(job_id, []).append(f"unacked{age}")
    finally:
        client.close()
    return places


def examine(
    cluster: Cluster,
    job_ids: list[str],
    specs: list[dict[str, Any]],
    references: list[bytes],
    messages: dict[str, list[str]],
) -> Findings:
    found = Findings(submitted=len(job_ids))
    for index, job_id in enumerate(job_ids):
        job = cluster.job(job_id)
        found.statuses[job["status"]] += 1
        if job["error"]:
            found.errors[job["error"]["type"]] += 1
        found.counted_attempts.append(job["attempts"])
        runs = cluster.attempts(job_id)
        found.runs[job_id] = len(runs)
        found.reasons.update(str(r["reason"]) for r in runs)
        if overlaps(runs):
            found.overlapping.append(job_id)
        if job["status"] == "succeeded":
            found.succeeded += 1
            found.compared += 1
            variant = index % len(references)
            if not same_weights(cluster.weights(job_id), references[variant], specs[variant]):
                found.differing.append(job_id)
        else:
            found.lost.append(job_id)
            where = ", ".join(messages.get(job_id, [])) or "none in Redis"
            error = f" {job['error']['type']}" if job["error"] else ""
            found.lost_detail[job_id] = (
                f"{job['status']}{error}, {job['attempts']} attempts, {len(runs)} runs, "
                f"step {job['progress']['step']}; messages: {where}"
            )
    return found


def count_in_logs(logs: Path, pattern: str, text: str) -> int:
    return sum(path.read_text(errors="replace").count(text) for path in logs.glob(pattern))


def report(
    args: argparse.Namespace, found: Findings, chaos: Chaos, logs: Path, wall: float
) -> None:
    def row(label: str, value: object, note: str = "") -> None:
        say(f"  {label:<42} {value!s:>8}  {note}".rstrip())

    runs = sorted(found.runs.values())
    per_job = Counter(runs)
    unfinished = sum(n for status, n in found.statuses.items() if status not in FINISHED)
    say("")
    say(
        f"chaos: {args.jobs} jobs ({len(variants(args))} specs"
        + (", every third on 2 nodes" if args.multi_node else "")
        + f"), {args.workers} workers, a SIGKILL "
        f"every ~{args.kill_interval:g} s (seed {args.seed}), slow={args.slow:g}, "
        f"max_attempts {args.max_attempts}, "
        + (
            f"random priorities {'/'.join(map(str, PRIORITIES))}, preempt gap {args.preempt_gap}"
            if preempting(args)
            else "no preemption"
        )
    )
    row("submitted", found.submitted)
    row("succeeded", found.succeeded)
    errors = ", ".join(f"{kind} {n}" for kind, n in sorted(found.errors.items()))
    row("failed", found.statuses["failed"], f"({errors})" if errors else "")
    row("cancelled", found.statuses["cancelled"])
    row("unfinished at the end", unfinished)
    row("lost (submitted, not succeeded)", len(found.lost), "must be 0")
    row("trained by two workers at once", len(found.overlapping), "must be 0")
    row(
        "final weights differ from reference",
        len(found.differing),
        f"must be 0 ({found.compared} compared)",
    )
    row("kills (SIGKILL of a worker's group)", chaos.kills, f"({chaos.kills_mid_job} mid-run)")
    row("workers that exited by themselves", chaos.unexpected_exits)
    row("runs (attempts listed)", sum(runs), f"max {max(runs, default=0)} for one job")
    row("preemptions (runs ended `preempted`)", found.reasons["preempted"], "not counted")
    row("counted attempts", sum(found.counted_attempts), f"max {max(found.counted_attempts)}")
    spread = ", ".join(f"{n} run{'s' * (n != 1)}: {jobs}" for n, jobs in sorted(per_job.items()))
    row("jobs by runs", "", spread)
    reasons = ", ".join(f"{reason} {n}" for reason, n in found.reasons.most_common())
    row("runs ended by", "", reasons)
    row("runs fenced off (worker logs: lease lost)", count_in_logs(logs, "worker-*", "lease lost"))
    row("deliveries that claimed nothing", count_in_logs(logs, "worker-*", "nothing claimable"))
    # A message names a hint: the database's order may start another job (scheduling.py).
    row("deliveries that started another job", count_in_logs(logs, "worker-*", "comes first"))
    row("messages left unacked by killed workers", found.unacked_removed, "(removed at the end)")
    row("killer phase", f"{chaos.seconds:.1f} s", f"(ended: {chaos.ended})")
    if chaos.ended != "all finished":
        row("calm phase after it", f"{chaos.calm_seconds:.1f} s", "(no kills)")
        row("jobs finished in the calm phase", chaos.finished_in_calm)
    row("wall time", f"{wall:.1f} s", "(references, setup, jobs, checks)")
    for label, ids in (("overlapping", found.overlapping), ("differing", found.differing)):
        if ids:
            say(f"  {label}: {' '.join(ids)}")
    for job_id, detail in found.lost_detail.items():
        say(f"  lost {job_id}: {detail}")


def preempting(args: argparse.Namespace) -> bool:
    return args.preempt_gap <= 1000


def priorities(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Each job's priority field: random (seeded), or none when preemption is off."""
    rng = random.Random(args.seed)
    while True:
        yield {"priority": rng.choice(PRIORITIES)} if preempting(args) else {}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.keep_logs:
        workdir = args.keep_logs.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="trainjob-chaos-"))
    queue = f"chaos-{secrets.token_hex(4)}"
    status = 2
    try:
        say(f"chaos: logs in {workdir}; queue {queue}")
        say(
            f"python {platform.python_version()}, {os.cpu_count()} CPUs; reference runs of "
            f"{len(variants(args))} specs ..."
        )
        specs_of_variants = variants(args)
        references = compute_references(workdir, specs_of_variants)
        with database(args) as url:
            env = service_env(
                database_url=url,
                redis_url=args.redis_url,
                queue=queue,
                home=str(workdir / "home"),
                **FAST_TIMINGS,
                # Preemption as eager as it gets: any run, however young.
                preempt_gap=str(min(args.preempt_gap, 1000)),
                min_run_seconds="0",
            )
            cluster = Cluster(env, workdir, args.slow, nodes=args.multi_node)
            removed = 0
            try:
                cluster.start_api()
                cluster.start_workers(args.workers)
                specs = [
                    specs_of_variants[i % len(specs_of_variants)]
                    | {
                        "name": f"chaos-{i:03d}",
                        "metadata": {"chaos": queue, "variant": str(i % len(specs_of_variants))},
                        "max_attempts": args.max_attempts,
                    }
                    | priority
                    for i, priority in zip(range(args.jobs), priorities(args), strict=False)
                ]
                submitter = Submitter(cluster, specs, args.submit_interval)
                submitter.start()
                say(
                    f"submitted {len(submitter.job_ids)} jobs, the others one every "
                    f"{args.submit_interval:g} s; the killer starts"
                )
                chaos = run_chaos(cluster, submitter, args)
                job_ids = submitter.job_ids
                messages = broker_messages(args.redis_url, queue)
                found = examine(cluster, job_ids, specs_of_variants, references, messages)
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):  # clean up undisturbed
                    signal.signal(signum, signal.SIG_IGN)
                cluster.stop()
                with contextlib.suppress(redis.RedisError):
                    removed = clear_queue(args.redis_url, queue)
        found.unacked_removed = removed
        report(args, found, chaos, workdir, time.monotonic() - started)
        bad = found.lost or found.overlapping or found.differing
        status = 1 if bad else 0
    except Interrupted as stop:
        say(f"\nchaos: interrupted ({stop}); cleaned up")
        status = 130
    except (RuntimeError, OSError, httpx.HTTPError, psycopg.Error, redis.RedisError) as error:
        say(f"chaos: {type(error).__name__}: {error}")
        status = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if args.keep_logs is None and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep_logs is None:
            say(f"chaos: logs kept in {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
