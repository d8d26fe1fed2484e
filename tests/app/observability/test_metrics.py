"""GET /metrics: jobs by status, queue depth and the step series read at scrape, and
HTTP timings by route template."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.db import Database, utcnow
from app.jobs import runs
from app.jobs.models import Job
from app.settings import Settings
from tests.app.jobs import helpers

SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 3,
}
SERIES = {
    "trainjob_jobs",
    "trainjob_queue_depth",
    "trainjob_step_duration_seconds",
    "trainjob_queue_wait_seconds",
    "trainjob_samples_per_second",
    "trainjob_http_request_duration_seconds",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    """Every sample of /metrics, by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def jobs(samples: Samples) -> dict[str, float]:
    """trainjob_jobs by status."""
    return {
        dict(labels)["status"]: value
        for (name, labels), value in samples.items()
        if name == "trainjob_jobs"
    }


def test_metrics_parse_as_prometheus_text_with_every_series(client: TestClient) -> None:
    response = client.get("/metrics")
    families = {family.name for family in text_string_to_metric_families(response.text)}
    assert families >= SERIES
    assert set(jobs(scrape(client))) == {
        "queued", "running", "cancelling", "pausing", "paused", "succeeded", "failed", "cancelled"
    }  # fmt: skip


def test_jobs_by_status_and_queue_depth_follow_submit_claim_and_cancel(
    client: TestClient, database: Database, settings: Settings
) -> None:
    before = scrape(client)
    depth = ("trainjob_queue_depth", (("queue", settings.queue),))
    first = client.post("/v1/jobs", json=SPEC).json()["id"]
    second = client.post("/v1/jobs", json=SPEC).json()["id"]
    submitted = scrape(client)
    assert jobs(submitted)["queued"] == jobs(before)["queued"] + 2
    assert submitted[depth] == before[depth] + 2  # no worker takes them here

    helpers.claim(database, first, "worker-a")
    running = jobs(scrape(client))
    assert running["queued"] == jobs(before)["queued"] + 1
    assert running["running"] == jobs(before)["running"] + 1

    assert client.post(f"/v1/jobs/{first}/cancel").json()["status"] == "cancelling"
    assert client.post(f"/v1/jobs/{second}/cancel").json()["status"] == "cancelled"
    after = jobs(scrape(client))
    assert after["queued"] == jobs(before)["queued"]
    assert after["running"] == jobs(before)["running"]
    assert after["cancelling"] == jobs(before)["cancelling"] + 1
    assert after["cancelled"] == jobs(before)["cancelled"] + 1


def test_http_requests_are_timed_by_route_template_never_the_raw_path(
    client: TestClient,
) -> None:
    def count(route: str, status: str) -> float:
        labels = (("method", "GET"), ("route", route), ("status", status))
        return scrape(client).get(("trainjob_http_request_duration_seconds_count", labels), 0.0)

    before = count("/v1/jobs/{job_id}", "404")
    unmatched = count("unmatched", "404")
    client.get("/v1/jobs/job_000000000000aaaaaaaaaaaa")
    client.get("/v1/jobs/job_000000000000bbbbbbbbbbbb")
    client.get("/no/such/page")
    assert count("/v1/jobs/{job_id}", "404") == before + 2
    assert count("unmatched", "404") == unmatched + 1

    routes = {
        dict(labels)["route"]
        for (name, labels) in scrape(client)
        if name.startswith("trainjob_http_request_duration_seconds")
    }
    assert "/metrics" in routes and "/v1/jobs/{job_id}" in routes
    assert not any("job_0000" in route or route == "/no/such/page" for route in routes)


def test_step_durations_and_running_rates_are_read_from_the_database_at_scrape(
    client: TestClient, database: Database
) -> None:
    def steps(samples: Samples, bucket: str | None = None) -> float:
        name = "trainjob_step_duration_seconds_" + ("bucket" if bucket else "count")
        return samples.get((name, (("le", bucket),) if bucket else ()), 0.0)

    def rate(samples: Samples, job_id: str) -> float | None:
        return samples.get(("trainjob_samples_per_second", (("job_id", job_id),)))

    scrape(client)  # the step count starts at the first scrape
    before = scrape(client)
    job_id = helpers.create(database)
    taken = helpers.claim(database, job_id, "w")
    timed = [
        helpers.metric(1) | {"step_seconds": 0.2, "samples_per_sec": 40.0},
        helpers.metric(2) | {"step_seconds": 3.0, "samples_per_sec": 8.0},
        helpers.metric(3),  # an older worker's: no step_seconds
    ]
    with database.session() as session:
        runs.record_progress(
            session, claim=taken, job_values={"step": 3, "metrics": timed[1]},
            metrics=timed, events=[],
        )  # fmt: skip
        session.commit()
    running = scrape(client)
    assert steps(running) == steps(before) + 2
    assert steps(running, "0.25") == steps(before, "0.25") + 1
    assert steps(running, "+Inf") == steps(before, "+Inf") + 2
    sum_key = ("trainjob_step_duration_seconds_sum", ())
    assert running[sum_key] == pytest.approx(before[sum_key] + 3.2)
    assert rate(running, job_id) == 8.0
    assert steps(scrape(client)) == steps(running)  # each step counted once

    with database.session() as session:
        runs.finish_job(session, claim=taken, status="succeeded")
        session.commit()
    assert rate(scrape(client), job_id) is None  # the rate of running jobs only


def test_queue_waits_of_the_runs_started_since_the_last_scrape_are_observed_once(
    client: TestClient, database: Database
) -> None:
    def waits(samples: Samples, bucket: str | None = None) -> float:
        name = "trainjob_queue_wait_seconds_" + ("bucket" if bucket else "count")
        return samples.get((name, (("le", bucket),) if bucket else ()), 0.0)

    scrape(client)  # the count starts at the first scrape
    before = scrape(client)
    job_id = helpers.create(database)
    with database.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(queued_at=utcnow() - timedelta(seconds=42))
        )
        session.commit()
    helpers.claim(database, job_id, "w")
    started = scrape(client)
    assert waits(started) == waits(before) + 1
    assert waits(started, "30.0") == waits(before, "30.0")
    assert waits(started, "60.0") == waits(before, "60.0") + 1
    sum_key = ("trainjob_queue_wait_seconds_sum", ())
    assert started[sum_key] == pytest.approx(before[sum_key] + 42, abs=5)
    assert waits(scrape(client)) == waits(started)  # each run counted once
