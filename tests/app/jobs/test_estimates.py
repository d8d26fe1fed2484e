"""The job GET's queue position (claim order) and estimated finish (measured pace), from
jobs and metrics rows made here, on both databases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import Database, upgrade
from app.jobs.estimates import finish_at_pace
from app.jobs.models import Job, JobMetric
from tests.app.jobs.helpers import claim

SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "digits"},
    "batch_size": 4,
    "micro_batch_size": 4,
    "max_steps": 100,
}
START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["postgres", "sqlite"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, make_postgres_database: Callable[[], str]
) -> Iterator[Database]:
    """A database of its own per test: a queue position counts every queued job of the
    table, so another test's (the session's shared PostgreSQL database) would count."""
    url = make_postgres_database() if request.param == "postgres" else f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


def submit(client: TestClient, **changes: Any) -> str:
    response = client.post("/v1/jobs", json={**SPEC, **changes})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def get(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def write_steps(database: Database, job_id: str, times: dict[int, datetime]) -> None:
    with database.session() as session:
        for step, time in times.items():
            session.merge(
                JobMetric(
                    job_id=job_id,
                    step=step,
                    loss=1.0,
                    lr=0.1,
                    samples_per_sec=1.0,
                    micro_batch_size=4,
                    time=time,
                    extra={},
                )
            )
        session.execute(update(Job).where(Job.id == job_id).values(step=max(times)))
        session.commit()


def start_run(database: Database, job_id: str, at: datetime) -> None:
    claim(database, job_id, "w0")
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(last_started_at=at))
        session.commit()


def test_queued_jobs_show_how_many_would_run_before_them_in_claim_order(
    client: TestClient,
) -> None:
    low, high, middle = (submit(client, priority=p) for p in (100, 900, 500))
    positions = {job_id: get(client, job_id)["queue_position"] for job_id in (low, high, middle)}
    assert positions == {high: 0, middle: 1, low: 2}
    assert get(client, high)["estimated_finish"] is None


def test_a_running_job_has_no_queue_position_and_no_estimate_before_two_steps(
    client: TestClient, database: Database
) -> None:
    job_id = submit(client)
    start_run(database, job_id, START)
    job = get(client, job_id)
    assert job["status"] == "running"
    assert (job["queue_position"], job["estimated_finish"]) == (None, None)
    write_steps(database, job_id, {1: START + timedelta(seconds=5)})
    assert get(client, job_id)["estimated_finish"] is None


def test_estimated_finish_follows_the_pace_of_the_current_runs_latest_steps(
    client: TestClient, database: Database
) -> None:
    job_id = submit(client)  # max_steps 100
    # An earlier run reached step 30 at 10 s a step; the current run resumed from step 10
    # at START and takes 2 s a step (steps 11..20 rewritten, 21..30 still the old run's).
    write_steps(database, job_id, {s: START - timedelta(seconds=10 * (31 - s)) for s in range(31)})
    start_run(database, job_id, START)
    current = {s: START + timedelta(seconds=2 * (s - 10)) for s in range(11, 21)}
    write_steps(database, job_id, current)
    # 80 steps left after step 20 (at START + 20 s), at 2 s each.
    expected = START + timedelta(seconds=20 + 80 * 2)
    estimate = datetime.fromisoformat(get(client, job_id)["estimated_finish"])
    assert estimate == expected


def test_finished_jobs_have_neither_field(client: TestClient, database: Database) -> None:
    job_id = submit(client)
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.commit()
    job = get(client, job_id)
    assert (job["queue_position"], job["estimated_finish"]) == (None, None)


def step(number: int, seconds: float) -> SimpleNamespace:
    return SimpleNamespace(step=number, time=START + timedelta(seconds=seconds))


def test_pace_is_measured_over_the_window_given_and_past_the_total_is_the_last_step() -> None:
    steps = [step(50, 100.0), step(40, 80.0), step(1, 2.0)]  # newest first: 2 s a step
    assert finish_at_pace(steps, total_steps=60) == START + timedelta(seconds=120)
    assert finish_at_pace(steps, total_steps=50) == START + timedelta(seconds=100)
    assert finish_at_pace(steps[:1], total_steps=60) is None
    assert finish_at_pace([step(5, 1.0), step(4, 1.0)], total_steps=60) is None
