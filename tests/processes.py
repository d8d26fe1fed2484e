"""Starting and stopping the service's real processes in tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import wait_for

TRAINJOB = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(**settings: str) -> dict[str, str]:
    """The test's environment with TRAINJOB_* replaced by `settings` (and one thread, so
    that results are bit-for-bit comparable with other processes). A test's queue gets a
    files queue of its own too: workers of other tests must not take its validations."""
    if "queue" in settings:
        settings.setdefault("files_queue", f"{settings['queue']}-files")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRAINJOB_")}
    env |= {f"TRAINJOB_{key.upper()}": value for key, value in settings.items()}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `trainjob` subprocess in its own process group, stopped (and its group killed) after."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*TRAINJOB, *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the leader (as Docker and `trainjob serve` stop a worker), then clear
    the group: pool children may outlive their parent."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_until_ready(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, f"{url}/readyz", interval=0.2)


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
    """An API (`trainjob serve --no-worker`) and, with `with_worker`, one worker (its
    environment plus `worker_env`), on the given TRAINJOB_* settings; yields a client of
    the API, and stops both after."""
    env = service_env(**settings)
    port = free_port()
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(
            running(["serve", "--no-worker", "--port", str(port)], env, logs / "api.log")
        )
        if with_worker:
            worker = env | (worker_env or {})
            stack.enter_context(running(["worker"], worker, logs / "worker.log"))
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, api, logs / "api.log")
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
