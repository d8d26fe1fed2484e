"""`trainjob serve` on embedded defaults: nothing configured, a job trains, Ctrl-C cleans up;
it never serves open beyond this machine, and nothing it started outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.auth import service as auth_service
from app.db import Database, upgrade
from tests.conftest import wait_for
from tests.processes import TRAINJOB, free_port, service_env, wait_for_status, wait_until_ready


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.add(child)
            frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


# Inherited by every process a serve starts. redis-server writes its process title over
# its environment, so it is found as a descendant instead (see `left_of`).
MARKER = "TRAINJOB_SERVE_TEST_MARKER"


def marked(marker: str) -> set[int]:
    """Live processes whose environment carries `marker`, wherever they were re-parented."""
    found = set()
    needle = f"{MARKER}={marker}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes().split(b"\0") and alive(int(environ.parent.name)):
                found.add(int(environ.parent.name))
    return found


@contextlib.contextmanager
def marked_serve(
    tmp_path: Path, *args: str, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """`trainjob serve` on embedded defaults under a marker; yields (process, url, marker)
    once it answers, and SIGKILLs whatever carries the marker after."""
    port, marker = free_port(), uuid.uuid4().hex
    env = service_env(home=str(tmp_path / "home"), **settings) | {MARKER: marker}
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        serve = subprocess.Popen([*TRAINJOB, "serve", "--port", str(port), *args], env=env,
                                 stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, serve, log)
        yield serve, url, marker
    finally:
        for pid in marked(marker) | descendants(serve.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        serve.wait()


def left_of(serve: subprocess.Popen[bytes], marker: str, known: set[int]) -> set[int]:
    """What is still alive of a serve: its marked processes, and the descendants seen
    while it ran (`known`)."""
    return marked(marker) | {pid for pid in known if alive(pid)}


def pool_child(serve: subprocess.Popen[bytes]) -> int | None:
    """The worker's pool process: a child of serve's worker child. Not any grandchild:
    the embedded redis-server (which keeps its name in its title) forks a short-lived
    child for each background save."""
    for child in children(serve.pid):
        with contextlib.suppress(OSError):
            if b"redis-server" in Path(f"/proc/{child}/cmdline").read_bytes():
                continue
        grandchildren = children(child)
        if grandchildren:
            return grandchildren[0]
    return None


def test_serve_from_a_fresh_home_trains_a_job_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    log = tmp_path / "serve.log"
    env = service_env(home=str(home))  # no TRAINJOB_DATABASE_URL, no TRAINJOB_REDIS_URL
    with log.open("wb") as output:
        serve = subprocess.Popen([*TRAINJOB, "serve", "--port", str(port)], env=env,
                                 stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(url, serve, log)
            with httpx.Client(base_url=url, timeout=10) as client:
                spec = {"model": {"type": "mlp"}, "dataset": {"type": "digits"},
                        "micro_batch_size": 8, "accumulation_steps": 2, "max_steps": 5}  # fmt: skip
                job = client.post("/v1/jobs", json=spec).json()
                done = wait_for_status(client, job["id"], {"succeeded", "failed"}, timeout=120)
                assert done["status"] == "succeeded", done["error"]
                assert client.get(f"/v1/jobs/{job['id']}/weights").status_code == 200

            # redis-server, the worker, its pool process: after a job the pool child
            # exits (one task per child) and its replacement is forked a moment later.
            def all_three() -> set[int] | None:
                found = descendants(serve.pid)
                return found if len(found) >= 3 else None

            children = wait_for(all_three, 30, "redis-server, the worker and its pool process")
            # The replacement child may still be importing torch: that must not hold us.
            serve.send_signal(signal.SIGINT)
            assert serve.wait(10) == 0
        finally:
            if serve.poll() is None:
                serve.kill()
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "the service's processes to exit")
    assert (home / "trainjob.db").exists() and (home / "redis.rdb").exists()
    assert f"trainjob is serving at {url}" in log.read_text()


def test_ctrl_c_mid_job_hands_it_back_and_the_next_serve_finishes_it(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    env = service_env(home=str(home), heartbeat_seconds="0.2", test_faults="slow=0.02")
    url = f"http://127.0.0.1:{port}"
    spec = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 8,
            "accumulation_steps": 2, "max_steps": 100, "checkpoint_every": 5}  # fmt: skip

    def serve(log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            process = subprocess.Popen([*TRAINJOB, "serve", "--port", str(port)], env=env,
                                       stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        wait_until_ready(url, process, log)
        return process

    first = serve(tmp_path / "first.log")
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            job_id = client.post("/v1/jobs", json=spec).json()["id"]

            def training() -> bool:
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job["status"] == "running" and job["progress"]["step"] >= 10

            wait_for(training, 60, "the job to train past step 10")
        first.send_signal(signal.SIGINT)
        assert first.wait(90) == 0
    finally:
        if first.poll() is None:
            first.kill()
    second = serve(tmp_path / "second.log")
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=120)
            attempts = client.get(f"/v1/jobs/{job_id}/attempts").json()["data"]
        second.send_signal(signal.SIGINT)
        assert second.wait(90) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert [(a["reason"], a["counted"]) for a in attempts] == [
        ("shutdown", False),
        ("succeeded", True),
    ]
    assert attempts[1]["resumed_from_step"] >= 10


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_everything_within_10_s_while_the_pool_child_is_starting(
    tmp_path: Path, signum: signal.Signals
) -> None:
    with marked_serve(tmp_path) as (serve, _, marker):
        child = wait_for(lambda: pool_child(serve), 30, "the worker's pool process")
        known = descendants(serve.pid)
        # Stopped: a child that never comes up (still importing torch, or stuck) and does
        # not answer SIGTERM, the worst a pool child can do while no job runs.
        os.kill(child, signal.SIGSTOP)
        began = time.monotonic()
        serve.send_signal(signum)
        try:
            code = serve.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running 10 s after {signum.name}")
        assert code == 0
        left = 10 - (time.monotonic() - began)
        wait_for(lambda: not left_of(serve, marker, known), left, "every process to exit")


def test_a_sigkilled_serve_leaves_no_process_behind(tmp_path: Path) -> None:
    with marked_serve(tmp_path) as (serve, _, marker):
        # redis-server, the worker and its pool process (maybe still importing torch)
        wait_for(lambda: pool_child(serve), 30, "the worker's pool process")
        known = descendants(serve.pid)
        assert len(known) >= 3, known
        serve.kill()
        serve.wait()
        wait_for(lambda: not left_of(serve, marker, known), 5, "every process of the serve to exit")


def _trainjob(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAINJOB, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_on_a_public_address_refuses_to_start_while_authentication_is_off(
    tmp_path: Path,
) -> None:
    env = service_env(home=str(tmp_path / "home"))  # no key, TRAINJOB_AUTH unset: auto
    result = _trainjob(env, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to listen on 0.0.0.0 with authentication off" in result.stderr
    assert "trainjob keys create --tenant NAME --admin" in result.stderr
    assert "TRAINJOB_AUTH=required" in result.stderr
    assert "serving at" not in result.stdout


def test_serve_on_a_public_address_with_a_key_serves_and_requires_it(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    url = f"sqlite:///{tmp_path / 'home' / 'trainjob.db'}"  # the embedded default's file
    upgrade(url)
    database = Database(url)
    try:
        with database.session() as session:
            _, key = auth_service.create_key(session, tenant="ops", admin=True)
            session.commit()
    finally:
        database.dispose()
    with marked_serve(tmp_path, "--no-worker", "--host", "0.0.0.0") as (_, url, _marker):
        assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 401
        answer = httpx.get(f"{url}/v1/jobs", headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200


def test_serve_open_on_a_public_address_takes_auth_off_and_warns(tmp_path: Path) -> None:
    with marked_serve(tmp_path, "--no-worker", "--host", "0.0.0.0", auth="off") as (
        _,
        url,
        _marker,
    ):
        assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 200
    log = (tmp_path / "serve.log").read_text()
    assert "authentication is OFF (TRAINJOB_AUTH=off)" in log
