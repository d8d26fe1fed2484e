"""GET /metrics: jobs by status and queue depth read at scrape, HTTP timings by route
template, and the step series fed by live events (Metrics.observe_event)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.db import Database
from app.main import create_app
from app.observability import metrics as metrics_module
from app.observability.metrics import Metrics
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
        "queued", "running", "cancelling", "succeeded", "failed", "cancelled"
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


@pytest.fixture
def app_metrics(tmp_path: Path) -> Metrics:
    """The metrics of an app that was never started: nothing read at scrape."""
    settings = Settings(home=tmp_path, redis_url="redis://127.0.0.1:6379/0")
    metrics: Metrics = create_app(settings).state.metrics
    return metrics


def step_event(step: int, **data: Any) -> dict[str, Any]:
    base = {"step": step, "loss": 1.0, "lr": 0.1, "samples_per_sec": 400.0,
            "micro_batch_size": 4, "time": "2026-11-25T00:00Z", "step_seconds": 0.02}  # fmt: skip
    return {"id": step, "type": "metrics", "data": base | data}


def test_observe_event_times_steps_and_tracks_each_running_job_until_it_finishes(
    app_metrics: Metrics,
) -> None:
    registry = app_metrics.registry

    def rate(job_id: str) -> float | None:
        return registry.get_sample_value("trainjob_samples_per_second", {"job_id": job_id})

    app_metrics.observe_event("job_a", {"id": 1, "type": "status", "data": {"status": "running"}})
    app_metrics.observe_event("job_a", step_event(1, step_seconds=0.2, samples_per_sec=40.0))
    app_metrics.observe_event("job_a", step_event(2, step_seconds=3.0, samples_per_sec=8.0))
    app_metrics.observe_event("job_b", step_event(1))
    app_metrics.observe_event("job_b", step_event(2, step_seconds=None))  # an older worker's

    assert registry.get_sample_value("trainjob_step_duration_seconds_count") == 3
    assert registry.get_sample_value("trainjob_step_duration_seconds_sum") == pytest.approx(3.22)
    bucket = {"le": "0.25"}
    assert registry.get_sample_value("trainjob_step_duration_seconds_bucket", bucket) == 2
    assert rate("job_a") == 8.0 and rate("job_b") == 400.0

    cancelling = {"id": 9, "type": "status", "data": {"status": "cancelling"}}
    app_metrics.observe_event("job_a", cancelling)
    assert rate("job_a") == 8.0  # still running until its next step
    finished = {"id": 10, "type": "status", "data": {"status": "cancelled"}}
    app_metrics.observe_event("job_a", finished)
    app_metrics.observe_event("job_b", {"id": 11, "type": "checkpoint", "data": {"step": 2}})
    assert rate("job_a") is None and rate("job_b") == 400.0
    app_metrics.observe_event("job_b", {"id": 12, "type": "status", "data": {"status": "queued"}})
    assert rate("job_b") is None  # handed back: not running anywhere now


def test_a_job_whose_steps_stop_coming_is_forgotten(
    app_metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_metrics.observe_event("job_quiet", step_event(1))
    assert app_metrics.samples_per_second() == {"job_quiet": 400.0}
    monkeypatch.setattr(metrics_module, "STALE_SECONDS", -1.0)  # as if long ago
    assert app_metrics.samples_per_second() == {}
