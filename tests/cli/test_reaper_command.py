"""`trainjob reaper` as its own process: a run whose worker died is re-queued and re-sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import redis
from sqlalchemy import update

from app.db import Database, upgrade, utcnow
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.spec import JobSpec
from tests.conftest import REDIS_URL, wait_for
from tests.processes import running, service_env

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "micro_batch_size": 4,
        "accumulation_steps": 2, "max_steps": 3}  # fmt: skip


def message_args(client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["argsrepr"] for raw in client.lrange(queue, 0, -1)]


def test_reaper_re_queues_a_run_whose_worker_stopped_heartbeating(
    tmp_path: Path, make_postgres_database: Callable[[], str], queue_name: str
) -> None:
    url = make_postgres_database()
    upgrade(url)
    database = Database(url)
    queue = f"{queue_name}-reaper"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with database.session() as session:
            job = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC))
            runs.claim_job(session, job_id=job.id, worker="gone@host", lease_timeout=60)
            # The worker died ten minutes ago.
            stale = utcnow() - timedelta(minutes=10)
            session.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=stale))
            session.commit()
            job_id = job.id
        env = service_env(database_url=url, redis_url=REDIS_URL, queue=queue,
                          reaper_interval_seconds="0.2", lease_timeout_seconds="5",
                          heartbeat_seconds="1")  # fmt: skip
        with running(["reaper"], env, tmp_path / "reaper.log") as reaper:
            log = tmp_path / "reaper.log"
            # The pass logs after it sends: wait for both, or the SIGTERM below may cut the
            # pass between the two.
            wait_for(
                lambda: (
                    repr([job_id]) in message_args(client, queue)
                    and "requeued " + job_id in log.read_text()
                ),
                30,
                "the job re-sent and logged",
            )
            assert reaper.poll() is None
        with database.session() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.status == "queued" and job.worker is None
        assert "requeued " + job_id in (tmp_path / "reaper.log").read_text()
        assert reaper.returncode == 0  # SIGTERM: a clean stop
    finally:
        client.delete(queue)
        client.close()
        database.dispose()
