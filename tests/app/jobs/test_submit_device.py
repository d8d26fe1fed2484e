"""`device: "cuda"` at submit, against a real API process: refused (422 naming `device`)
while no live worker of the queue has CUDA, queued once one announces it or when the
operator allows it (TRAINJOB_ALLOW_UNSEEN_CUDA). It was accepted and failed at start."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.db import upgrade
from tests.conftest import REDIS_URL
from tests.processes import api_and_worker
from worker.presence import announce, withdraw

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 8,
        "accumulation_steps": 1, "max_steps": 1}  # fmt: skip
CUDA = {**SPEC, "device": "cuda"}
StartApi = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture
def queue(queue_name: str) -> str:
    return f"{queue_name}-device"


@pytest.fixture
def start_api(make_postgres_database: Callable[[], str], queue: str, tmp_path: Path) -> StartApi:
    def start(**settings: str) -> AbstractContextManager[httpx.Client]:
        database_url = make_postgres_database()
        upgrade(database_url)
        return api_and_worker(
            tmp_path,
            with_worker=False,
            database_url=database_url,
            redis_url=REDIS_URL,
            queue=queue,
            home=str(tmp_path / "home"),
            **settings,
        )

    return start


@pytest.fixture
def presence(redis_client: redis.Redis) -> Iterator[Callable[..., None]]:
    """Announce a worker the way a worker's main process does (worker/presence.py)."""
    names: list[str] = []

    def worker(name: str, *, device: str, queues: list[str]) -> None:
        info: dict[str, Any] = {"name": name, "hostname": "test", "pid": 1, "device": device,
                                "cuda_visible_devices": None, "queues": queues,
                                "started_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
        announce(redis_client, info, ttl_seconds=60)
        names.append(name)

    yield worker
    for name in names:
        withdraw(redis_client, name)


def test_cuda_is_refused_at_submit_until_a_cuda_worker_of_the_queue_is_live(
    start_api: StartApi, presence: Callable[..., None], queue: str
) -> None:
    with start_api() as client:
        refused = client.post("/v1/jobs", json=CUDA)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert [field["path"] for field in error["fields"]] == ["device"]
        assert "no live worker has CUDA" in error["message"]

        presence(f"cpu-{queue}", device="cpu", queues=[queue])
        presence(f"cuda-elsewhere-{queue}", device="cuda", queues=[f"{queue}-other"])
        assert client.post("/v1/jobs", json=CUDA).status_code == 422
        assert client.post("/v1/jobs", json=SPEC).status_code == 201  # `auto` runs anywhere

        presence(f"cuda-{queue}", device="cuda", queues=[queue])
        accepted = client.post("/v1/jobs", json=CUDA)
        assert accepted.status_code == 201 and accepted.json()["status"] == "queued"


def test_the_operator_may_queue_cuda_jobs_with_no_cuda_worker_seen(start_api: StartApi) -> None:
    with start_api(allow_unseen_cuda="true") as client:
        accepted = client.post("/v1/jobs", json=CUDA)
        assert accepted.status_code == 201 and accepted.json()["status"] == "queued"
