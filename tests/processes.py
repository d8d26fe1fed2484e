"""Starting, waiting for and stopping the service's real processes: `trainjob serve`,
`trainjob worker`, `trainjob run` and a private redis-server.

The one place for it: the tests import it, and so do the benchmarks (bench/api.py,
bench/chaos.py), which is why it needs nothing from pytest. A process runs in a
process group of its own with its output in a log file; a process that exits while we
wait for it, or is not ready in time, raises ProcessFailed with the end of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import redis

TRAINJOB = [sys.executable, "-m", "cli.main"]
API = [*TRAINJOB, "serve", "--no-worker"]

# What the processes of tests/test_fault_tolerance.py and bench/chaos.py run with:
# settings (TRAINJOB_*) under which a lost worker is noticed within about 2.5 s, and a
# job that checkpoints often, so that a worker killed mid-run has something to resume.
FAST_TIMINGS = {
    "heartbeat_seconds": "0.2",
    "lease_timeout_seconds": "2",
    "reaper_interval_seconds": "0.5",
    "requeue_after_seconds": "3",
    "progress_flush_seconds": "0.2",
    "shutdown_timeout_seconds": "20",
}
RESUMABLE_SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 2,
    "max_steps": 60,
    "checkpoint_every": 5,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "lr_schedule": {"type": "cosine", "warmup_steps": 5},
    "seed": 3,
    "device": "cpu",
}


class ProcessFailed(RuntimeError):
    """A process exited while we waited for it, or was not ready in time."""


class Server(NamedTuple):
    process: subprocess.Popen[bytes]
    url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(**settings: str) -> dict[str, str]:
    """This environment with TRAINJOB_* replaced by `settings` (and one thread, so that
    results are bit-for-bit comparable with other processes). A test's queue gets a
    files queue of its own too: workers of other tests must not take its validations."""
    if "queue" in settings:
        settings.setdefault("files_queue", f"{settings['queue']}-files")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRAINJOB_")}
    env |= {f"TRAINJOB_{key.upper()}": value for key, value in settings.items()}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env


def start(command: list[str], env: dict[str, str] | None, log: Path) -> subprocess.Popen[bytes]:
    """`command` in a process group of its own (stop it with stop_group), output to `log`."""
    with log.open("wb") as output:
        return subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the whole group: pool children may outlive their parent."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stop_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the leader (as Docker and `trainjob serve` stop a worker), then clear
    the group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    kill_group(process)


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `trainjob` subprocess, stopped (and its group killed) after."""
    process = start([*TRAINJOB, *args], env, log)
    try:
        yield process
    finally:
        stop_group(process)


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({log} unreadable)"


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_while_running(
    process: subprocess.Popen[bytes],
    log: Path,
    condition: Callable[[], bool],
    timeout: float,
    what: str,
) -> None:
    """Poll `condition` while `process` runs; ProcessFailed if it exits first, or when
    `timeout` passes."""

    def alive_and_met() -> bool:
        if process.poll() is not None:
            raise ProcessFailed(
                f"{log.name}: exited with {process.returncode} before {what}:\n{tail(log)}"
            )
        return condition()

    try:
        wait_for(alive_and_met, timeout, what, interval=0.1)
    except TimeoutError as error:
        raise ProcessFailed(f"{log.name}: {error}:\n{tail(log)}") from None


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_ready(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60,
    path: str = "/readyz",
) -> None:
    """Until the server at `url` says it is ready: GET `path` answers 200."""
    wait_while_running(process, log, lambda: answers(url + path), timeout, url + path)


def launch(command: list[str], env: dict[str, str], log: Path) -> Server:
    """`command --port PORT` on a free port, started; wait_until_ready says when it is up."""
    port = free_port()
    return Server(start([*command, "--port", str(port)], env, log), f"http://127.0.0.1:{port}")


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[Server]:
    """An API (`trainjob serve --no-worker`, which runs the reaper) once it is ready,
    stopped after."""
    api = launch(API, env, log)
    try:
        wait_until_ready(api.url, api.process, log, timeout=90)
        yield api
    finally:
        stop_group(api.process)


def wait_for_worker(process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    """Until the worker consumes its queue: Celery prints 'ready.'."""

    def ready() -> bool:
        return log.exists() and "ready." in log.read_text(errors="replace")

    wait_while_running(process, log, ready, timeout, "the worker to be ready")


def pings(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    """A private redis-server on `port`, once it answers; it keeps nothing on disk, so
    a restart starts empty."""
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = start([*command, "--appendonly", "no"], None, log)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_while_running(process, log, lambda: pings(url), 20, f"redis-server on {port}")
    except BaseException:
        stop_group(process)
        raise
    return process


def start_training(spec: dict[str, Any], folder: Path) -> subprocess.Popen[bytes]:
    """`trainjob run` of `spec` in `folder` (spec.json, run.log and out/), started."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    command = [*TRAINJOB, "run", str(folder / "spec.json"), "--out", str(folder / "out")]
    return start([*command, "--quiet"], service_env(), folder / "run.log")


def trained_weights(process: subprocess.Popen[bytes], folder: Path, timeout: float = 300) -> bytes:
    """The final weights of a start_training run, once it has succeeded."""
    if process.wait(timeout) != 0:
        log = folder / "run.log"
        raise ProcessFailed(f"trainjob run exited with {process.returncode}:\n{tail(log)}")
    return (folder / "out" / "weights.safetensors").read_bytes()


def trainjob_run(spec: dict[str, Any], folder: Path, timeout: float = 300) -> bytes:
    """The final weights of an undisturbed `trainjob run` of `spec`, in `folder`."""
    process = start_training(spec, folder)
    try:
        return trained_weights(process, folder, timeout)
    finally:
        kill_group(process)


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float) -> dict:  # type: ignore[type-arg]
    def reached() -> dict | None:  # type: ignore[type-arg]
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    job: dict = wait_for(reached, timeout, f"job {job_id} to reach {statuses}", interval=0.1)  # type: ignore[type-arg]
    return job


@contextmanager
def api_and_worker(
    logs: Path,
    *,
    with_worker: bool = True,
    worker_env: dict[str, str] | None = None,
    **settings: str,
) -> Iterator[httpx.Client]:
    """An API and, with `with_worker`, one worker (its environment plus `worker_env`), on
    the given TRAINJOB_* settings; yields a client of the API, and stops both after."""
    env = service_env(**settings)
    with contextlib.ExitStack() as stack:
        if with_worker:  # first: it starts while the API does
            stack.enter_context(running(["worker"], env | (worker_env or {}), logs / "worker.log"))
        api = stack.enter_context(serving(env, logs / "api.log"))
        with httpx.Client(base_url=api.url, timeout=30) as client:
            yield client
