"""The service under load: one API process on PostgreSQL and Redis, driven on loopback.

Not part of CI (a smoke run is: `--smoke`, tests/bench/test_api_smoke.py). It creates a
fresh PostgreSQL database (dropped at the end), a private redis-server (a shared Redis
would bring other runs' pub/sub rings to this API's hub) and a Celery queue, starts
the API the way production does (`trainjob serve --no-worker`: one uvicorn process,
the reaper on its default interval, auth off because the database has no API key,
every setting at its default but the per-tenant cap, raised so that submits are not
refused) and, as the ceiling, a bare FastAPI endpoint (bench/bare_app.py) served by
uvicorn with the same settings on another port. Then, one after the other:

(a) submit: POST /v1/jobs from 16 closed-loop clients, no worker running (the jobs
    stay queued); requests/s, p50, p99;
(b) GET /v1/jobs/{id} from 64 clients against GET /bare from 64 clients, in
    alternating rounds (bare, job, bare, job, ...) so that both see the same noise;
    requests/s, p50, p99 of each and the ratio of throughputs (median of the paired
    rounds); the job GET from one client (its latency without queueing); and where its
    time goes: `bench/bare_app.py --layers` serves the real app with probe routes that
    each stop one layer short of the job GET, each round paired with a bare one;
(c) GET /v1/jobs?limit=20 with 10,000 jobs stored (bulk inserted in one transaction),
    also with ?status=queued and with an `after` cursor 9,000 jobs deep, from 1 and from
    8 clients; p50, p99, and the query plan (EXPLAIN ANALYZE) of each;
(e) 100 Server-Sent Event streams on one job: the job is submitted with no worker,
    the streams connect and read its backlog, then a worker (TRAINJOB_TEST_FAULTS=slow
    paces it) trains it while they watch. The database reads of job events in that
    window are counted by PostgreSQL (pg_stat_user_tables: index and sequential scans of
    `job_events`; only the API reads that table, workers only insert) and compared with
    the job's optimizer steps and with its worker's flushes (the transactions that wrote
    its metrics events, counted by their distinct `xmin`); every stream must receive
    every metrics event, in order, and the final status;
(d) dispatch: with that worker idle, 20 tiny jobs one at a time; `started_at -
    created_at` of each (both server timestamps: the API's insert, the worker's claim),
    and from the worker's log the part between receiving the message and the claim.
    Idle: the fresh pool child forked after each job has loaded the engine (its log
    line), then 0.5 s more; how long that load takes is reported beside.

HTTP load comes from `wrk` (one thread) when it is installed, else from an asyncio
httpx client; the httpx client is also measured against the bare endpoint, so the
table says how far it could go. Targets (issue 7): job GET >= 50 % of the bare
endpoint's throughput with p99 < 25 ms; list p99 < 50 ms at 10,000 jobs; dispatch p50
< 100 ms; the streams cost no more than one event read per optimizer step in total. A
missed target is printed, not an error: the exit status is 1 only when something
answered wrongly (an HTTP error, a stream that missed events), 2 when the stack could
not be set up, 130 on Ctrl-C.

    .venv/bin/python bench/api.py                    # the full run, about 10 minutes
    .venv/bin/python bench/api.py --smoke            # every measurement, tiny, seconds
    .venv/bin/python bench/api.py --only streams --keep-logs /tmp/api-bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg
import redis
from common import cpu_model, package_version
from sqlalchemy import insert

from app.db import Database, upgrade
from app.jobs.models import Job
from app.jobs.spec import JobSpec

# Run as `python bench/api.py`: the checkout's root is not on sys.path, and the process
# helpers are the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.processes import (
    API,
    TRAINJOB,
    ProcessFailed,
    free_port,
    launch,
    service_env,
    start,
    start_redis,
    stop_group,
    wait_for_worker,
    wait_until_ready,
    wait_while_running,
)

BARE_APP = [sys.executable, str(Path(__file__).with_name("bare_app.py"))]
FINISHED = frozenset({"succeeded", "failed", "cancelled"})

# What a user submits: a small model, the shipped digits, the usual options.
SPEC: dict[str, Any] = {
    "name": "bench mlp on digits",
    "metadata": {"team": "bench", "purpose": "load"},
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 1,
    "max_steps": 1,
    "checkpoint_every": 0,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "lr_schedule": {"type": "cosine", "warmup_steps": 0},
    "device": "cpu",
}
# Two micro-batches a step: the worker's `slow` pause applies to each.
STREAM_ACCUMULATION = 2

PHASES = ("submit", "get", "list", "streams", "dispatch")
TARGET_GET_RATIO = 0.5
TARGET_GET_P99_MS = 25.0
TARGET_LIST_P99_MS = 50.0
TARGET_DISPATCH_P50_MS = 100.0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop and clean up."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclass(frozen=True)
class Scale:
    round_seconds: float  # one load round
    rounds: int  # paired bare/job GET rounds, and rounds of the others
    submit_clients: int
    get_clients: int
    list_clients: int
    stored_jobs: int
    streams: int
    stream_steps: int
    stream_seconds: float  # about how long the streamed job trains
    dispatches: int
    idle_seconds: float  # pause before each dispatch, once the worker's fresh child is ready
    settle_seconds: float  # PostgreSQL's table statistics unchanged this long: flushed


FULL = Scale(
    round_seconds=5.0,
    rounds=5,
    submit_clients=16,
    get_clients=64,
    list_clients=8,
    stored_jobs=10_000,
    streams=100,
    stream_steps=200,
    stream_seconds=15.0,
    dispatches=20,
    idle_seconds=0.5,
    settle_seconds=11.0,
)
SMOKE = Scale(
    round_seconds=0.1,
    rounds=1,
    submit_clients=4,
    get_clients=8,
    list_clients=1,
    stored_jobs=50,
    streams=5,
    stream_steps=5,
    stream_seconds=0.3,
    dispatches=1,  # the worker has run (e)'s job: this one waits for a fresh child too
    idle_seconds=0.1,
    settle_seconds=0.0,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The API under load on PostgreSQL and Redis: submit, job GET against a "
        "bare FastAPI endpoint, list at 10,000 jobs, dispatch latency, 100 event streams.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="every measurement at a tiny scale (seconds)"
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="HTTP load generator: wrk (one thread), or the asyncio httpx client; auto: wrk "
        "when it is installed (%(default)s)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PHASES,
        help="run only this measurement (repeatable; default: all)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per measurement (5; smoke 1)")
    parser.add_argument("--round-seconds", type=float, help="seconds per round (5)")
    parser.add_argument("--jobs", type=int, help="jobs stored for the list (10,000)")
    parser.add_argument("--streams", type=int, help="event streams on one job (100)")
    parser.add_argument("--dispatches", type=int, help="jobs timed submit -> running (20)")
    parser.add_argument(
        "--postgres-admin",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="libpq URL to create and drop the temporary database with (%(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        help="broker and live events. Default: a private redis-server on a free port "
        "(other runs on a shared Redis would ring this API's hub: pub/sub ignores database "
        "numbers), or redis://127.0.0.1:6379/0 when redis-server is not installed",
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="write the processes' logs here and keep them"
    )
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    overrides = {
        "rounds": args.rounds,
        "round_seconds": args.round_seconds,
        "stored_jobs": args.jobs,
        "streams": args.streams,
        "dispatches": args.dispatches,
    }
    values = {name: getattr(base, name) for name in base.__dataclass_fields__}
    values |= {name: value for name, value in overrides.items() if value is not None}
    args.scale = Scale(**values)
    if min(args.scale.rounds, args.scale.streams, args.scale.dispatches) < 1:
        parser.error("--rounds, --streams and --dispatches must be at least 1")
    if args.scale.round_seconds <= 0 or args.scale.stored_jobs < 1:
        parser.error("--round-seconds and --jobs must be positive")
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install -y wrk)")
    # wrk runs whole seconds: a smoke run takes the Python client unless told otherwise.
    args.use_wrk = args.client == "wrk" or (
        args.client == "auto" and not args.smoke and shutil.which("wrk") is not None
    )
    return args


def say(message: str) -> None:
    print(message, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values (NaN when there are none)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Round:
    """One closed-loop round: every client sends its next request when the last answers."""

    requests: int
    errors: int  # connection errors and answers >= 400
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Request:
    paths: tuple[str, ...]  # taken round robin
    method: str = "GET"
    body: str | None = None  # JSON


WRK_SCRIPT = """
local paths = {%(paths)s}
local method = "%(method)s"
local body = %(body)s
local headers = {}
if body then headers["Content-Type"] = "application/json" end
local next_index = 0
request = function()
  next_index = next_index %% #paths + 1
  return wrk.format(method, paths[next_index], headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_round(
    base_url: str, request: Request, clients: int, seconds: float, workdir: Path
) -> Round:
    """wrk, one thread, `clients` connections, for `seconds`."""
    script = workdir / f"wrk-{secrets.token_hex(4)}.lua"
    body = "nil" if request.body is None else f"[==[{request.body}]==]"
    paths = ", ".join(json.dumps(path) for path in request.paths)
    script.write_text(WRK_SCRIPT % {"paths": paths, "method": request.method, "body": body})
    command = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    if seconds < 1:  # wrk counts whole seconds; a smoke round is shorter
        command[3] = "-d1s"
    output = subprocess.run(
        [*command, "-s", str(script), base_url], capture_output=True, text=True, timeout=120
    )
    script.unlink()
    for line in output.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            requests, duration_us, errors, p50_us, p99_us = map(int, line.split()[1:])
            return Round(requests, errors, duration_us / 1e6, p50_us / 1e3, p99_us / 1e3)
    raise RuntimeError(f"wrk printed no result:\n{output.stdout}\n{output.stderr}")


async def _httpx_round(base_url: str, request: Request, clients: int, seconds: float) -> Round:
    latencies: list[float] = []
    errors = 0
    order = itertools.count()
    headers = {"content-type": "application/json"} if request.body is not None else {}
    content = request.body.encode() if request.body is not None else None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def one_client(deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                path = request.paths[next(order) % len(request.paths)]
                started = time.perf_counter()
                try:
                    response = await client.request(
                        request.method, path, content=content, headers=headers
                    )
                    failed = response.status_code >= 400
                except httpx.HTTPError:
                    failed = True
                latencies.append(time.perf_counter() - started)
                errors += failed

        began = time.perf_counter()
        await asyncio.gather(*(one_client(began + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return Round(
        len(latencies),
        errors,
        elapsed,
        percentile(latencies, 0.50) * 1e3,
        percentile(latencies, 0.99) * 1e3,
    )


def httpx_round(base_url: str, request: Request, clients: int, seconds: float) -> Round:
    """The asyncio httpx client: `clients` tasks on one event loop, for `seconds`."""
    return asyncio.run(_httpx_round(base_url, request, clients, seconds))


@dataclass
class Load:
    """Runs rounds with the chosen client and keeps every round, by name."""

    use_wrk: bool
    workdir: Path
    round_seconds: float
    rounds: dict[str, list[Round]] = field(default_factory=dict)

    @property
    def client_name(self) -> str:
        return "wrk" if self.use_wrk else "httpx"

    def run(
        self, name: str, base_url: str, request: Request, clients: int, seconds: float
    ) -> Round:
        if self.use_wrk:
            result = wrk_round(base_url, request, clients, seconds, self.workdir)
        else:
            result = httpx_round(base_url, request, clients, seconds)
        self.rounds.setdefault(name, []).append(result)
        return result


@dataclass(frozen=True)
class Summary:
    rounds: int
    requests: int
    errors: int
    rate: float  # medians over the rounds
    p50_ms: float
    p99_ms: float


def summarize(rounds: Sequence[Round]) -> Summary:
    return Summary(
        rounds=len(rounds),
        requests=sum(r.requests for r in rounds),
        errors=sum(r.errors for r in rounds),
        rate=median([r.rate for r in rounds]),
        p50_ms=median([r.p50_ms for r in rounds]),
        p99_ms=median([r.p99_ms for r in rounds]),
    )


# --------------------------------------------------------------------------- the stack


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Stack:
    """The run's database, queue and processes."""

    args: argparse.Namespace
    logs: Path
    database_name: str = field(default_factory=lambda: f"trainjob_bench_{secrets.token_hex(6)}")
    queue: str = field(default_factory=lambda: f"bench-api-{secrets.token_hex(4)}")
    api: subprocess.Popen[bytes] | None = None
    bare: subprocess.Popen[bytes] | None = None
    layered: subprocess.Popen[bytes] | None = None  # bench/bare_app.py --layers, for (b)
    worker: subprocess.Popen[bytes] | None = None
    redis: subprocess.Popen[bytes] | None = None  # a private redis-server
    redis_url: str = ""
    api_url: str = ""
    bare_url: str = ""
    layered_url: str = ""
    created: bool = False

    @property
    def libpq_url(self) -> str:
        admin: str = self.args.postgres_admin
        return admin.rsplit("/", 1)[0] + "/" + self.database_name

    @property
    def database_url(self) -> str:
        return self.libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)

    def env(self, **extra: str) -> dict[str, str]:
        return service_env(
            database_url=self.database_url,
            redis_url=self.redis_url,
            queue=self.queue,
            home=str(self.logs / "home"),
            # The default cap (100 queued or running per tenant) would answer 429 after
            # 100 submits; everything else stays at its default.
            max_active_jobs_per_tenant=str(10**9),
            **extra,
        )

    def start_redis(self) -> None:
        self.redis_url = self.args.redis_url or "redis://127.0.0.1:6379/0"
        if self.args.redis_url or shutil.which("redis-server") is None:
            return
        port, log = free_port(), self.logs / "redis.log"
        self.redis = start_redis(port, log)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        self.start_redis()
        with psycopg.connect(self.args.postgres_admin, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.database_name}"')
        self.created = True
        upgrade(self.database_url)
        # All three start at once, then each is waited for.
        self.api, self.api_url = launch(API, self.env(), self.logs / "api.log")
        self.bare, self.bare_url = launch(BARE_APP, self.env(), self.logs / "bare.log")
        if "get" in (self.args.only or PHASES):
            layered = [*BARE_APP, "--layers"]
            self.layered, self.layered_url = launch(layered, self.env(), self.logs / "layered.log")
        wait_until_ready(self.api_url, self.api, self.logs / "api.log", 90)
        wait_until_ready(self.bare_url, self.bare, self.logs / "bare.log", 60, path="/bare")
        if self.layered is not None:
            wait_until_ready(self.layered_url, self.layered, self.logs / "layered.log", 90)

    def stop_layered(self) -> None:
        """Its reaper and live hub are a second API's: gone once (b) is measured."""
        if self.layered is not None:
            stop_group(self.layered)
            self.layered = None

    def start_worker(self, slow: float) -> None:
        env = self.env(test_faults=f"slow={slow:g}")
        self.worker = start([*TRAINJOB, "worker"], env, self.logs / "worker.log")

    def wait_worker_ready(self) -> None:
        assert self.worker is not None
        wait_for_worker(self.worker, self.logs / "worker.log")

    def stop(self) -> None:
        processes = [p for p in (self.worker, self.api, self.bare, self.layered) if p is not None]
        for process in processes:  # all at once: each takes a moment to shut down
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            stop_group(process)
        self.worker = self.api = self.bare = self.layered = None
        if self.redis is not None:  # private: it goes with its queue
            stop_group(self.redis)
            self.redis = None
        elif self.redis_url:
            with contextlib.suppress(redis.RedisError):
                clear_queue(self.redis_url, self.queue)
        if self.created:
            with psycopg.connect(self.args.postgres_admin, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')
            self.created = False

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.libpq_url, autocommit=True) as connection:
            cursor = connection.execute(query, params)
            return cursor.fetchall() if cursor.description else []


def clear_queue(redis_url: str, queue: str) -> None:
    """Remove the run's queue and kombu's bindings of it from Redis."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        keys += list(client.scan_iter(match=f"{queue}\x06\x16*"))
        client.delete(*keys)
    finally:
        client.close()


def event_reads(stack: Stack) -> int:
    """Scans of job_events so far, as PostgreSQL counts them (index and sequential)."""
    with psycopg.connect(stack.libpq_url, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE relname = 'job_events'"
        ).fetchone()
    return int(row[0]) if row else 0


def settled_event_reads(stack: Stack, settle: float, *, quiet: bool) -> int:
    """The count once PostgreSQL has it all: a backend reports its table statistics at most
    once a second while it works, and 10 s after it goes idle. Waits `settle` seconds;
    with `quiet`, until the count has not moved for that long. (`settle` 0: no wait, the
    count may lag.)"""
    if not quiet:
        time.sleep(settle)
        return event_reads(stack)
    value, since = event_reads(stack), time.monotonic()
    deadline = since + 4 * settle
    while time.monotonic() - since < settle and time.monotonic() < deadline:
        time.sleep(0.5)
        current = event_reads(stack)
        if current != value:
            value, since = current, time.monotonic()
    return value


# --------------------------------------------------------------------------- measurements


@dataclass
class Results:
    client: str
    submit: Summary | None = None
    client_ceiling: Summary | None = None  # httpx against the bare endpoint (when wrk runs)
    bare_get: Summary | None = None
    job_get: Summary | None = None
    job_get_one_client: Summary | None = None
    get_ratio: float = float("nan")
    layers: dict[str, tuple[Summary, float]] = field(default_factory=dict)  # and % of bare
    stored_jobs: int = 0
    lists: dict[str, Summary] = field(default_factory=dict)
    plans: dict[str, str] = field(default_factory=dict)
    dispatch_ms: list[float] = field(default_factory=list)
    dispatch_in_worker_ms: list[float] = field(default_factory=list)
    preload_seconds: list[float] = field(default_factory=list)  # a pool child's engine import
    streams: StreamReport | None = None
    problems: list[str] = field(default_factory=list)


def warm_up(load: Load, stack: Stack, request: Request, clients: int) -> None:
    """Connections, caches and code paths warm; not recorded."""
    saved = dict(load.rounds)
    seconds = min(1.0, load.round_seconds)
    load.run("warm-up", stack.bare_url, Request(("/bare",)), clients, seconds)
    load.run("warm-up", stack.api_url, request, clients, seconds)
    load.rounds = saved


def measure_submit(load: Load, stack: Stack, scale: Scale, results: Results) -> None:
    body = json.dumps(SPEC)
    request = Request(("/v1/jobs",), method="POST", body=body)
    before = stack.sql("SELECT count(*) FROM jobs")[0][0]
    for _ in range(scale.rounds):
        load.run("submit", stack.api_url, request, scale.submit_clients, scale.round_seconds)
    results.submit = summarize(load.rounds["submit"])
    created = stack.sql("SELECT count(*) FROM jobs")[0][0] - before
    # Every 201 is a row (wrk counts only answers >= 400 as errors).
    answered = results.submit.requests - results.submit.errors
    if created < answered or results.submit.errors:
        results.problems.append(
            f"submit: {results.submit.errors} errors, {created} jobs stored for {answered} answers"
        )


def measure_get(
    load: Load, stack: Stack, scale: Scale, results: Results, job_ids: Sequence[str]
) -> None:
    job = Request(tuple(f"/v1/jobs/{job_id}" for job_id in job_ids))
    bare = Request(("/bare",))
    clients, seconds = scale.get_clients, scale.round_seconds
    ratios = []
    for _ in range(scale.rounds):  # paired rounds: both see the same noise
        bare_round = load.run("bare", stack.bare_url, bare, clients, seconds)
        job_round = load.run("job", stack.api_url, job, clients, seconds)
        ratios.append(job_round.rate / bare_round.rate if bare_round.rate else float("nan"))
    results.bare_get = summarize(load.rounds["bare"])
    results.job_get = summarize(load.rounds["job"])
    results.get_ratio = median(ratios)
    for _ in range(scale.rounds):
        load.run("job, 1 client", stack.api_url, job, 1, seconds)
    results.job_get_one_client = summarize(load.rounds["job, 1 client"])
    if load.use_wrk:  # how far the Python client would have gone, for the record
        rounds = [
            httpx_round(stack.bare_url, bare, clients, seconds) for _ in range(min(3, scale.rounds))
        ]
        results.client_ceiling = summarize(rounds)
    for name in ("bare", "job", "job, 1 client"):
        errors = sum(r.errors for r in load.rounds[name])
        if errors:
            results.problems.append(f"GET ({name}): {errors} errors")


# Each probe is the job GET's route stopped one layer short; the last row is the read the
# job GET made before issue 13 (one hop to the thread pool, the ORM's session.get).
LAYERS = (
    ("app middleware, async route", "/bench/async"),
    ("+ its dependencies (reads, principal)", "/bench/deps"),
    ("+ the job's row (coalesced async read)", "/bench/query/{job_id}"),
)
FOR_COMPARISON = ("before: thread hop + session.get", "/bench/old/{job_id}")


def measure_layers(
    load: Load, stack: Stack, scale: Scale, results: Results, job_ids: Sequence[str]
) -> None:
    """The job GET one layer at a time (bench/bare_app.py --layers), each round paired
    with one of the bare endpoint: where the job GET's time goes."""
    url = stack.layered_url
    try:
        clients, seconds = scale.get_clients, scale.round_seconds
        bare = Request(("/bare",))
        paths = [(name, url, path) for name, path in LAYERS]
        paths.append(("the job GET (+ its response model)", stack.api_url, "/v1/jobs/{job_id}"))
        paths.append((FOR_COMPARISON[0], url, FOR_COMPARISON[1]))
        ratios: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        for _ in range(min(3, scale.rounds)):  # a diagnosis: three rounds are enough
            for name, base, path in paths:
                bare_round = load.run("layers: bare", stack.bare_url, bare, clients, seconds)
                request = Request(tuple(path.format(job_id=job_id) for job_id in job_ids))
                layer = load.run(f"layer {name}", base, request, clients, seconds)
                ratios[name].append(layer.rate / bare_round.rate if bare_round.rate else 0.0)
        for name, _, _ in paths:
            summary = summarize(load.rounds[f"layer {name}"])
            results.layers[name] = (summary, median(ratios[name]))
            if summary.errors:
                results.problems.append(f"layer {name}: {summary.errors} errors")
    finally:
        stack.stop_layered()


def stored_job_rows(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """`count` jobs of the past, one a minute, newest now: mostly finished, some queued."""
    rng = random.Random(seed)
    spec = JobSpec.model_validate(SPEC | {"max_steps": 200}).model_dump(mode="json")
    now = datetime.now(UTC)
    rows = []
    for index in range(count):
        created = now - timedelta(minutes=count - index, seconds=1)
        milliseconds = int(created.timestamp() * 1000)
        status = rng.choices(["succeeded", "failed", "cancelled", "queued"], weights=[80, 8, 7, 5])[
            0
        ]
        finished = status != "queued"
        step = 200 if status == "succeeded" else rng.randrange(0, 200) if finished else 0
        metrics = (
            {
                "step": step,
                "epoch": step * 8 // 1617,
                "loss": rng.uniform(0.05, 2.3),
                "lr": 0.01,
                "grad_norm": rng.uniform(0.1, 3.0),
                "samples_seen": step * 8,
                "tokens_seen": 0,
                "samples_per_sec": rng.uniform(500, 5000),
                "step_seconds": rng.uniform(0.001, 0.01),
                "micro_batch_size": 8,
                "accumulation_steps": 1,
                "skipped": False,
                "time": created.timestamp() + 30,
                "eval_loss": None,
                "eval_accuracy": None,
            }
            if step
            else None
        )
        rows.append(
            {
                "id": f"job_{milliseconds:012x}{rng.getrandbits(48):012x}",
                "name": spec["name"],
                "tenant": "default",
                "status": status,
                "spec": spec,
                "batch_size": 8,
                "micro_batch_size": 8,
                "accumulation_steps": 1,
                "step": step,
                "max_steps": 200,
                "epoch": step * 8 // 1617,
                "samples_seen": step * 8,
                "tokens_seen": 0,
                "metrics": metrics,
                "error_type": "nan_loss" if status == "failed" else None,
                "error_message": "the loss is NaN" if status == "failed" else None,
                "attempts": 1 if finished else 0,
                "max_attempts": 3,
                "cancel_requested": status == "cancelled",
                "release_requested": False,
                "worker": "trainjob-1@bench" if finished else None,
                "lease": 1 if finished else 0,
                "heartbeat_at": created + timedelta(seconds=30) if finished else None,
                # Recent: the reaper leaves a queued job alone for requeue_after (300 s).
                "enqueued_at": now,
                "runtime_seconds": 30.0 if finished else 0.0,
                "created_at": created,
                "started_at": created + timedelta(seconds=1) if finished else None,
                "finished_at": created + timedelta(seconds=31) if finished else None,
                "updated_at": created + timedelta(seconds=31),
            }
        )
    return rows


def store_jobs(stack: Stack, count: int) -> None:
    """Top the jobs table up to `count` rows, in one transaction."""
    missing = count - stack.sql("SELECT count(*) FROM jobs")[0][0]
    if missing <= 0:
        return
    database = Database(stack.database_url)
    try:
        with database.session() as session:
            session.execute(insert(Job), stored_job_rows(missing))
            session.commit()
    finally:
        database.dispose()
    stack.sql("ANALYZE jobs")


def explain(stack: Stack, where: str, params: Sequence[Any]) -> str:
    """The plan of the list query the route sends (newest first, limit + 1)."""
    rows = stack.sql(
        f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM jobs {where} ORDER BY id DESC LIMIT 21",
        params,
    )
    plan = rows[0][0][0]
    node = plan["Plan"]
    while node.get("Node Type") == "Limit" and node.get("Plans"):
        node = node["Plans"][0]
    index = f" using {node['Index Name']}" if "Index Name" in node else ""
    return f"{node['Node Type']}{index}, {plan['Execution Time']:.3f} ms in PostgreSQL"


def measure_list(load: Load, stack: Stack, scale: Scale, results: Results) -> None:
    store_jobs(stack, scale.stored_jobs)
    results.stored_jobs = stack.sql("SELECT count(*) FROM jobs")[0][0]
    deep = min(9_000, results.stored_jobs - 21)
    cursor = stack.sql("SELECT id FROM jobs ORDER BY id DESC OFFSET %s LIMIT 1", (max(deep, 0),))
    after = cursor[0][0]
    variants = {
        "?limit=20": ("/v1/jobs?limit=20", "", ()),
        "?status=queued": ("/v1/jobs?limit=20&status=queued", "WHERE status = %s", ("queued",)),
        f"?after= ({deep:,} deep)": (
            f"/v1/jobs?limit=20&after={after}",
            "WHERE id < %s",
            (after,),
        ),
    }
    seconds = scale.round_seconds
    concurrencies = sorted({1, scale.list_clients})
    for _ in range(scale.rounds):  # the variants in turn, so that they share the noise
        for clients in concurrencies:
            for name, (path, _, _) in variants.items():
                label = f"{name}, {clients} client{'s' if clients > 1 else ''}"
                load.run(f"list {label}", stack.api_url, Request((path,)), clients, seconds)
    for name, (_, where, params) in variants.items():
        results.plans[name] = explain(stack, where, params)
    for label in [name for name in load.rounds if name.startswith("list ")]:
        summary = results.lists[label.removeprefix("list ")] = summarize(load.rounds[label])
        if summary.errors:
            results.problems.append(f"{label}: {summary.errors} errors")


@dataclass
class StreamReport:
    streams: int
    steps: int
    complete: int  # streams that got every metrics event, in order, and the final status
    events_per_stream: float  # median
    setup_reads: int  # job_events scans while the streams connected and read the backlog
    live_reads: int  # job_events scans while the job ran and the streams followed it
    flushes: int  # transactions of the worker that wrote the job's metrics events
    train_seconds: float  # the job's started_at .. finished_at
    window_seconds: float  # worker start .. last stream closed
    api_cpu_seconds: float  # of the API process in that window
    settled: bool  # PostgreSQL's statistics were given time to arrive (not in a smoke run)


@dataclass
class StreamLog:
    ids: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    final: str | None = None
    error: str | None = None  # the stream broke off


async def follow_stream(
    client: httpx.AsyncClient, job_id: str, on_first_event: Callable[[], None]
) -> StreamLog:
    """One client: the job's events from the start until its final status."""
    log = StreamLog()
    fields: dict[str, str] = {}
    try:
        async with client.stream("GET", f"/v1/jobs/{job_id}/events/stream?after=0") as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line:
                    if not line.startswith(":") and ":" in line:
                        name, value = line.split(":", 1)
                        fields[name] = value.removeprefix(" ")
                    continue
                if "event" in fields:
                    data = json.loads(fields["data"])
                    if not log.ids:
                        on_first_event()
                    log.ids.append(int(fields["id"]))
                    if fields["event"] == "metrics":
                        log.steps.append(int(data["step"]))
                    elif fields["event"] == "status" and data.get("status") in FINISHED:
                        log.final = data["status"]
                fields = {}
    except httpx.HTTPError as error:
        log.error = f"{type(error).__name__}: {error}"
    return log


class StreamsStuck(Exception):
    """The streams did not all connect."""


async def _measure_streams(stack: Stack, scale: Scale, reads_before: int) -> StreamReport:
    spec = SPEC | {
        "name": "bench streamed job",
        "max_steps": scale.stream_steps,
        "accumulation_steps": STREAM_ACCUMULATION,
    }
    limits = httpx.Limits(max_connections=scale.streams + 8)
    timeout = httpx.Timeout(30.0, read=120.0)
    async with httpx.AsyncClient(base_url=stack.api_url, limits=limits, timeout=timeout) as client:
        response = await client.post("/v1/jobs", json=spec)  # no worker yet: it stays queued
        response.raise_for_status()
        job_id = response.json()["id"]
        connected = asyncio.Event()
        waiting = scale.streams

        def one_connected() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                connected.set()

        streams = [
            asyncio.create_task(follow_stream(client, job_id, one_connected))
            for _ in range(scale.streams)
        ]
        try:
            await asyncio.wait_for(connected.wait(), 60)
        except TimeoutError:
            for stream in streams:
                stream.cancel()
            ended = await asyncio.gather(*streams, return_exceptions=True)
            errors = {log.error for log in ended if isinstance(log, StreamLog) and log.error}
            raise StreamsStuck(
                f"only {scale.streams - waiting} of {scale.streams} streams had their first "
                f"event after 60 s; errors: {sorted(errors) or 'none'}"
            ) from None
        # The streams wait, connected, while their backlog reads reach the statistics
        # (the hub's periodic read of the job may run meanwhile: it counts here).
        reads_connected = await asyncio.to_thread(
            settled_event_reads, stack, scale.settle_seconds, quiet=False
        )
        assert stack.api is not None
        cpu_before, began = cpu_seconds(stack.api.pid), time.monotonic()
        # A pause per micro-batch, so that the job trains for about stream_seconds.
        stack.start_worker(scale.stream_seconds / (scale.stream_steps * STREAM_ACCUMULATION))
        logs = await asyncio.wait_for(asyncio.gather(*streams), 180 + scale.stream_seconds * 4)
        window, cpu = time.monotonic() - began, cpu_seconds(stack.api.pid) - cpu_before
    # The job has finished and every stream has closed: nothing reads its events now.
    reads_done = await asyncio.to_thread(
        settled_event_reads, stack, scale.settle_seconds, quiet=True
    )
    flushes, seconds = stack.sql(
        "SELECT (SELECT count(DISTINCT xmin::text) FROM job_events "
        "        WHERE job_id = %s AND type = 'metrics'), "
        "       extract(epoch FROM finished_at - started_at) FROM jobs WHERE id = %s",
        (job_id, job_id),
    )[0]
    expected = list(range(1, scale.stream_steps + 1))
    complete = sum(
        log.steps == expected and log.ids == sorted(set(log.ids)) and log.final == "succeeded"
        for log in logs
    )
    return StreamReport(
        streams=scale.streams,
        steps=scale.stream_steps,
        complete=complete,
        events_per_stream=median([len(log.ids) for log in logs]),
        setup_reads=reads_connected - reads_before,
        live_reads=reads_done - reads_connected,
        flushes=int(flushes),
        train_seconds=float(seconds or 0.0),
        window_seconds=window,
        api_cpu_seconds=cpu,
        settled=scale.settle_seconds > 0,
    )


def measure_streams(stack: Stack, scale: Scale, results: Results) -> None:
    before = settled_event_reads(stack, scale.settle_seconds, quiet=True)
    report = asyncio.run(_measure_streams(stack, scale, before))
    results.streams = report
    if report.complete != report.streams:
        results.problems.append(
            f"streams: only {report.complete} of {report.streams} got every event"
        )


def measure_dispatch(stack: Stack, scale: Scale, results: Results) -> None:
    """Tiny jobs one at a time on an idle worker: the claim's started_at - created_at."""
    if stack.worker is None:  # (e) did not get to start it
        stack.start_worker(slow=0.0)
    stack.wait_worker_ready()
    worker = stack.worker
    assert worker is not None
    dispatched: list[str] = []
    log = stack.logs / "worker.log"
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        for _ in range(scale.dispatches):
            # Idle: after a job the pool forks a fresh child, which loads the engine.
            idle = functools.partial(child_ready, log)
            wait_while_running(worker, log, idle, 120, "the worker's pool child")
            time.sleep(scale.idle_seconds)
            response = client.post("/v1/jobs", json=SPEC | {"name": "bench dispatch"})
            response.raise_for_status()
            job_id = response.json()["id"]
            deadline = time.monotonic() + 120
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in FINISHED or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if job["status"] != "succeeded" or job["started_at"] is None:
                results.problems.append(f"dispatch: job {job_id} ended {job['status']}")
                continue
            created = datetime.fromisoformat(job["created_at"])
            started = datetime.fromisoformat(job["started_at"])
            results.dispatch_ms.append((started - created).total_seconds() * 1e3)
            dispatched.append(job_id)
    results.dispatch_in_worker_ms = received_to_claimed(log, dispatched)
    results.preload_seconds = [seconds for seconds, _ in preloads(log)]


# Celery's "Task ...[job_id:suffix] received" (the worker's main process) and the run's
# "job job_id: attempt ..." line, logged by the pool child right after its claim.
LOG_TIME = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):"
RECEIVED = re.compile(LOG_TIME + r".*Task \S+\[(job_[0-9a-f]{24}):[0-9a-f]+\] received")
CLAIMED = re.compile(LOG_TIME + r".*\] job (job_[0-9a-f]{24}): attempt ")


# worker/tasks.py: each pool child, as it starts, loads the engine before it takes a job.
PRELOADED = re.compile(
    LOG_TIME + r".*\] (?:preloaded the engine in ([0-9.]+) s|preloading the engine failed)"
)


def preloads(log: Path) -> list[tuple[float, str]]:
    """(seconds, log time) of each pool child's engine preload so far; NaN: it failed."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = PRELOADED.match(line)
        if match:
            found.append((float(match[2]) if match[2] else float("nan"), match[1]))
    return found


def child_ready(log: Path) -> bool:
    """The worker's pool has a child that has loaded the engine and has no task yet: one
    child per task received, plus the one waiting."""
    received = sum(
        1 for line in log.read_text(errors="replace").splitlines() if RECEIVED.match(line)
    )
    return len(preloads(log)) > received


def received_to_claimed(log: Path, job_ids: Sequence[str]) -> list[float]:
    """Milliseconds from the worker receiving each job's message to its claim (one clock)."""
    seen: dict[str, dict[str, datetime]] = {}
    for line in log.read_text(errors="replace").splitlines():
        for what, pattern in (("received", RECEIVED), ("claimed", CLAIMED)):
            match = pattern.match(line)
            if match:
                when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
                seen.setdefault(match[2], {}).setdefault(what, when)
    return [
        (times["claimed"] - times["received"]).total_seconds() * 1e3
        for job_id in job_ids
        if {"received", "claimed"} <= (times := seen.get(job_id, {})).keys()
    ]


def settle_queued(stack: Stack) -> None:
    """Jobs that only fill the tables: cancelled, and their messages gone, so that the
    worker started later sees only the jobs it is timed on."""
    clear_queue(stack.redis_url, stack.queue)
    stack.sql(
        "UPDATE jobs SET status = 'cancelled', cancel_requested = true, finished_at = now() "
        "WHERE status = 'queued'"
    )


# --------------------------------------------------------------------------- report


def versions(stack: Stack) -> list[str]:
    """Date, machine and versions: the first lines of the report."""
    postgres = stack.sql("SHOW server_version")[0][0]
    client = redis.Redis.from_url(stack.redis_url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    packages = ", ".join(
        f"{name} {package_version(name)}"
        for name in ("fastapi", "starlette", "uvicorn", "sqlalchemy", "psycopg", "httpx")
    )
    private = " (a private redis-server)" if stack.redis is not None else ""
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Linux {platform.release()}",
        f"Python {platform.python_version()}, PostgreSQL {postgres}, Redis {redis_version}"
        f"{private}; {packages}",
    ]


def mark(met: bool) -> str:
    return "met" if met else "NOT MET"


def row(what: str, value: str, target: str = "", status: str = "") -> str:
    return f"  {what:<44} {value:<46} {target:<15} {status}".rstrip()


def load_text(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    return f"{summary.rate:>7,.0f} req/s  p50 {summary.p50_ms:6.1f}  p99 {summary.p99_ms:6.1f} ms"


def report(results: Results, scale: Scale, machine: list[str], wall: float) -> list[str]:
    lines = [
        *machine,
        f"load generator: {results.client}; {scale.rounds} round(s) of "
        f"{scale.round_seconds:g} s per row, medians of the rounds",
        row("measurement", "value", "target", "status"),
    ]
    if results.submit is not None:
        label = f"(a) submit POST /v1/jobs, {scale.submit_clients} clients"
        lines.append(row(label, load_text(results.submit)))
    if results.job_get is not None:
        lines += get_rows(results, scale)
    for index, (name, summary) in enumerate(results.lists.items()):
        clients = name.rsplit(", ", 1)[1]
        label = f"(c) GET /v1/jobs{name}" if index == 0 else f"    GET /v1/jobs{name}"
        lines.append(row(label, load_text(summary)))
        lines.append(
            row(
                f"      p99 at {results.stored_jobs:,} jobs, {clients}",
                f"{summary.p99_ms:.1f} ms",
                f"< {TARGET_LIST_P99_MS:g} ms",
                mark(summary.p99_ms < TARGET_LIST_P99_MS),
            )
        )
    if results.dispatch_ms:
        dispatch = sorted(results.dispatch_ms)
        p50 = percentile(dispatch, 0.5)
        lines.append(
            row(
                f"(d) dispatch submit -> running, {len(dispatch)} jobs",
                f"p50 {p50:,.0f}  p99 {percentile(dispatch, 0.99):,.0f}  "
                f"max {dispatch[-1]:,.0f} ms",
                f"p50 < {TARGET_DISPATCH_P50_MS:g} ms",
                mark(p50 < TARGET_DISPATCH_P50_MS),
            )
        )
        if results.dispatch_in_worker_ms:
            in_worker = sorted(results.dispatch_in_worker_ms)
            lines.append(
                row(
                    "    of which in the worker: received -> claimed",
                    f"p50 {percentile(in_worker, 0.5):,.0f}  "
                    f"p99 {percentile(in_worker, 0.99):,.0f} ms (worker log)",
                )
            )
        if results.preload_seconds:
            preload = sorted(results.preload_seconds)
            lines.append(
                row(
                    f"    a fresh pool child loads the engine, {len(preload)} children",
                    f"p50 {percentile(preload, 0.5):.2f}  max {preload[-1]:.2f} s (before a job)",
                )
            )
    if results.streams is not None:
        lines += stream_rows(results.streams)
    if results.plans:
        lines.append("query plans of the list (EXPLAIN ANALYZE):")
        lines += [f"  {name:<24} {plan}" for name, plan in results.plans.items()]
    for problem in results.problems:
        lines.append(f"PROBLEM: {problem}")
    lines.append(f"wall time {wall:.1f} s")
    return lines


def get_rows(results: Results, scale: Scale) -> list[str]:
    assert results.job_get is not None
    clients = scale.get_clients
    p99 = results.job_get.p99_ms
    lines = [
        row(f"(b) bare GET /bare, {clients} clients", load_text(results.bare_get)),
        row(f"    job GET /v1/jobs/{{id}}, {clients} clients", load_text(results.job_get)),
        row("    job GET /v1/jobs/{id}, 1 client", load_text(results.job_get_one_client)),
        row(
            "    job GET / bare throughput",
            f"{results.get_ratio:.0%} (median of paired rounds)",
            f">= {TARGET_GET_RATIO:.0%}",
            mark(results.get_ratio >= TARGET_GET_RATIO),
        ),
        row(
            f"    job GET p99, {clients} clients",
            f"{p99:.1f} ms",
            f"< {TARGET_GET_P99_MS:g} ms",
            mark(p99 < TARGET_GET_P99_MS),
        ),
    ]
    if results.layers:
        lines.append(
            f"  where the job GET's time goes ({clients} clients; % of bare, paired rounds):"
        )
        for name, (summary, ratio) in results.layers.items():
            lines.append(row(f"    {name}", f"{load_text(summary)}  {ratio:4.0%}"))
    if results.client_ceiling is not None:
        lines.append(
            row(
                f"    httpx client vs bare, {clients} clients",
                load_text(results.client_ceiling),
                "",
                "(the Python client's ceiling)",
            )
        )
    return lines


def stream_rows(streams: StreamReport) -> list[str]:
    unsettled = [] if streams.settled else ["    (read counts not settled: a smoke run)"]
    return [
        *unsettled,
        row(
            f"(e) {streams.streams} streams x {streams.steps} steps: event reads",
            f"{streams.live_reads} while training ({streams.live_reads / streams.steps:.2f}/step)",
            f"<= {streams.steps} (1/step)",
            mark(streams.live_reads <= streams.steps),
        ),
        row(
            "    worker flushes of the job (metrics commits)",
            f"{streams.flushes} ({streams.live_reads / max(streams.flushes, 1):.2f} reads/flush)",
        ),
        row(
            "    reads to connect and replay the backlog",
            f"{streams.setup_reads} ({streams.setup_reads / streams.streams:.2f}/stream)",
        ),
        row(
            "    streams that got every event",
            f"{streams.complete}/{streams.streams} ({streams.events_per_stream:.0f} events each)",
            "all",
            mark(streams.complete == streams.streams),
        ),
        row(
            "    API CPU while streaming",
            f"{streams.api_cpu_seconds:.2f} s in {streams.window_seconds:.1f} s "
            f"(trained {streams.train_seconds:.1f} s)",
        ),
    ]


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def log_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="trainjob-api-bench-") as folder:
        yield Path(folder)


class Phases:
    """Says what starts, and how long the previous phase took."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        say(f"  ({now - self.began:.1f} s)\n{what}" if now - self.began > 0.05 else what)
        self.began = now


def attempt(what: str, results: Results, measurement: Callable[[], None]) -> None:
    """Run one measurement; a failure is reported with the results, and the next runs."""
    try:
        measurement()
    except (ProcessFailed, Interrupted, KeyboardInterrupt):
        raise
    except Exception as error:
        results.problems.append(f"{what}: {type(error).__name__}: {error}")


def some_jobs(stack: Stack, count: int) -> list[str]:
    """Ids of `count` jobs: the oldest stored, topped up by submitting."""
    stored = stack.sql("SELECT id FROM jobs ORDER BY id LIMIT %s", (count,))
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        for _ in range(count - len(stored)):
            client.post("/v1/jobs", json=SPEC).raise_for_status()
    return [job_id for (job_id,) in stack.sql("SELECT id FROM jobs ORDER BY id LIMIT %s", (count,))]


def run(args: argparse.Namespace, logs: Path) -> int:
    scale: Scale = args.scale
    began = time.monotonic()
    stack = Stack(args, logs)
    load = Load(args.use_wrk, logs, scale.round_seconds)
    results = Results(client="wrk 1 thread" if load.use_wrk else "httpx (asyncio)")
    phase = Phases()
    only = set(args.only or PHASES)
    try:
        phase(f"setting up: database {stack.database_name}, queue {stack.queue}, logs {logs}")
        stack.start()
        machine = versions(stack)
        if "submit" in only:
            phase("(a) submit")
            warm_up(load, stack, Request(("/readyz",)), scale.get_clients)
            measure_submit(load, stack, scale, results)
        if "get" in only:
            phase("(b) job GET against the bare endpoint")
            job_ids = some_jobs(stack, min(100, scale.stored_jobs))
            settle_queued(stack)
            warm_up(
                load, stack, Request(tuple(f"/v1/jobs/{i}" for i in job_ids)), scale.get_clients
            )
            measure_get(load, stack, scale, results, job_ids)
            attempt("layers", results, lambda: measure_layers(load, stack, scale, results, job_ids))
        settle_queued(stack)
        if "list" in only:
            phase(f"(c) list at {scale.stored_jobs:,} jobs")
            attempt("list", results, lambda: measure_list(load, stack, scale, results))
            settle_queued(stack)
        if "streams" in only:
            phase(f"(e) {scale.streams} event streams on one job")
            attempt("streams", results, lambda: measure_streams(stack, scale, results))
        if "dispatch" in only:
            phase(f"(d) dispatch of {scale.dispatches} jobs")
            attempt("dispatch", results, lambda: measure_dispatch(stack, scale, results))
        phase("cleaning up")
    except ProcessFailed as error:
        say(f"bench/api.py: could not set up: {error}")
        return 2
    finally:
        stack.stop()
    say("\n".join(report(results, scale, machine, time.monotonic() - began)))
    return 1 if results.problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with log_directory(args.keep_logs) as logs:
            return run(args, logs)
    except (KeyboardInterrupt, Interrupted):
        say("bench/api.py: interrupted; cleaned up")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
