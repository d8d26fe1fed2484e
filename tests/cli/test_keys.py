"""`trainjob keys` against a real service: a created key opens it, a revoked one closes it,
and concurrent submits with one Idempotency-Key make one job (Postgres, real threads)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from app.db import upgrade
from tests.processes import TRAINJOB, free_port, running, service_env, wait_until_ready

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 4,
        "accumulation_steps": 2, "max_steps": 3}  # fmt: skip


def keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAINJOB, "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_keys_create_list_revoke_and_idempotent_concurrent_submits(
    tmp_path: Path, make_postgres_database: Callable[[], str], queue_name: str
) -> None:
    url = make_postgres_database()
    upgrade(url)
    env = service_env(database_url=url, redis_url="redis://127.0.0.1:6379/0",
                      queue=f"{queue_name}-keys", home=str(tmp_path / "home"),
                      reaper_interval_seconds="0")  # fmt: skip
    created = keys(env, "create", "--tenant", "acme", "--name", "ci", "--json")
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    key = made["key"]
    assert made["tenant"] == "acme" and key.startswith(f"tjk_{made['id']}_")
    listed = json.loads(keys(env, "list", "--json").stdout)["data"]
    assert [item["id"] for item in listed] == [made["id"]] and key not in json.dumps(listed)
    assert keys(env, "create", "--tenant", "../etc").returncode == 1  # not a tenant name

    port = free_port()
    with running(["serve", "--no-worker", "--port", str(port)], env, tmp_path / "api.log") as api:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, api, tmp_path / "api.log")
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/v1/jobs").status_code == 401
            headers = {"authorization": f"Bearer {key}", "idempotency-key": "deploy-7"}

            def submit(_: int) -> httpx.Response:
                return client.post("/v1/jobs", json=SPEC, headers=headers)

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(submit, range(8)))
            assert sorted(r.status_code for r in answers) == [200] * 7 + [201]
            assert len({r.json()["id"] for r in answers}) == 1
            jobs = client.get("/v1/jobs", headers={"authorization": f"Bearer {key}"}).json()
            assert len(jobs["data"]) == 1

            assert keys(env, "revoke", made["id"]).returncode == 0
            assert client.get("/v1/jobs", headers=headers).status_code == 401
    assert key not in (tmp_path / "api.log").read_text()  # never logged
