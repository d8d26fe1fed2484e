"""`trainjob serve` on embedded defaults: nothing configured, a job trains, Ctrl-C cleans up."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx

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
            serve.send_signal(signal.SIGINT)
            assert serve.wait(90) == 0
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
