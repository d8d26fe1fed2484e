"""A worker's presence in Redis: the announcement itself, and a real worker process that
appears on the dashboard while it runs and leaves it when it stops or dies."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import REDIS_URL, wait_for
from tests.processes import running, service_env
from worker.presence import announce, detect_device, presence_key, withdraw


def test_announce_writes_the_worker_s_record_with_a_ttl(redis_client: redis.Redis) -> None:
    name = f"trainjob-1@presence-{os.getpid()}"
    info = {
        "name": name, "hostname": "h", "pid": 1, "device": "cpu", "cuda_visible_devices": None,
        "queues": ["gpu"], "started_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    now = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
    try:
        record = announce(redis_client, info, ttl_seconds=15, now=now)
        stored = json.loads(redis_client.get(presence_key(name)) or b"null")
        assert stored == record == info | {"last_seen": "2026-11-26T09:30:00+00:00"}
        assert 14_000 < redis_client.pttl(presence_key(name)) <= 15_000
        withdraw(redis_client, name)
        assert not redis_client.exists(presence_key(name))
    finally:
        redis_client.delete(presence_key(name))


def test_the_device_is_cuda_only_with_an_nvidia_gpu_not_hidden(tmp_path: Path) -> None:
    no_driver = tmp_path / "absent"
    no_gpu = tmp_path / "empty"
    no_gpu.mkdir()
    one_gpu = tmp_path / "gpus"
    (one_gpu / "0000:3b:00.0").mkdir(parents=True)

    assert detect_device(no_driver, visible_devices="0")["device"] == "cpu"
    assert detect_device(no_gpu, visible_devices="0")["device"] == "cpu"
    assert detect_device(one_gpu, visible_devices="1,2") == {
        "device": "cuda", "cuda_visible_devices": "1,2",
    }  # fmt: skip
    for hidden in ("", "-1"):  # CUDA's way of hiding every GPU
        assert detect_device(one_gpu, visible_devices=hidden)["device"] == "cpu"


@contextmanager
def worker_process(
    tmp_path: Path, postgres_url: str, queue: str, heartbeat_seconds: float, concurrency: int = 1
) -> Iterator[Any]:
    env = service_env(
        database_url=postgres_url,
        redis_url=REDIS_URL,
        queue=queue,
        home=str(tmp_path / "home"),
        heartbeat_seconds=str(heartbeat_seconds),
    )
    args = ["worker", "--concurrency", str(concurrency)]
    with running(args, env, tmp_path / "worker.log") as process:
        yield process


def live_workers(client: TestClient, queue: str) -> dict[str, dict[str, Any]]:
    workers = client.get("/v1/dashboard").json()["workers"]
    return {worker["name"]: worker for worker in workers if queue in worker["queues"]}


@pytest.fixture
def dashboard_client(postgres_url: str, queue_name: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path / "api", database_url=postgres_url, redis_url=REDIS_URL,
        queue=queue_name, reaper_interval_seconds=0,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.slow
def test_a_real_worker_appears_with_its_device_and_pool_size_and_is_removed_on_a_clean_stop(
    tmp_path: Path,
    postgres_url: str,
    queue_name: str,
    dashboard_client: TestClient,
    redis_client: redis.Redis,
) -> None:
    queue = f"{queue_name}-presence-stop"
    # A long TTL (15 s): gone at once after the exit can only mean the key was deleted.
    with worker_process(tmp_path, postgres_url, queue, 5, concurrency=2) as process:
        workers = wait_for(lambda: live_workers(dashboard_client, queue), 60, "the worker")
        (worker,) = workers.values()
        assert worker["name"] == f"trainjob-{process.pid}@{worker['hostname']}"
        assert worker["pid"] == process.pid  # the main process, not a pool child
        # The same guess the worker made, here: "cpu" on a machine without an NVIDIA GPU.
        assert worker["device"] == detect_device()["device"]
        assert worker["job_id"] is None
        assert worker["concurrency"] == 2  # its pool: preemption counts free slots by it
        assert 0 < redis_client.pttl(presence_key(worker["name"])) <= 15_000
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        assert not redis_client.exists(presence_key(worker["name"]))
    assert live_workers(dashboard_client, queue) == {}


@pytest.mark.slow
def test_a_killed_worker_keeps_announcing_until_killed_then_expires(
    tmp_path: Path,
    postgres_url: str,
    queue_name: str,
    dashboard_client: TestClient,
    redis_client: redis.Redis,
) -> None:
    queue = f"{queue_name}-presence-kill"
    with worker_process(tmp_path, postgres_url, queue, heartbeat_seconds=1) as process:
        (worker,) = wait_for(lambda: live_workers(dashboard_client, queue), 60, "it").values()
        first_seen = worker["last_seen"]
        # Announced again on the consumer's timer: last_seen moves, the TTL is renewed.
        wait_for(
            lambda: (
                live_workers(dashboard_client, queue)[worker["name"]]["last_seen"] != first_seen
            ),
            5,
            "a second announcement",
        )
        os.killpg(process.pid, signal.SIGKILL)  # no stop(): only the TTL (3 s) removes it
        process.wait(10)
        wait_for(lambda: live_workers(dashboard_client, queue) == {}, 10, "the key to expire")
