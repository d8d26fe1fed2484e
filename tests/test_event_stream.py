"""The event stream of a job training on a real worker, read over real HTTP.

A client connects mid-job from a cursor, drops the connection on purpose, reconnects
with Last-Event-ID, and must have received every metrics event from its cursor to the
end: in order, no gaps, no repeats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartService, wait_for

SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 2,
    "max_steps": 120,
    "checkpoint_every": 20,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service(
        "stream",
        # About 4 s of training: long enough to join it in the middle.
        worker_env={"TRAINJOB_TEST_FAULTS": "slow=0.015"},
        progress_flush_seconds="0.1",
        stream_keepalive_seconds="1",
    ) as client:
        yield client


def read_events(
    client: httpx.Client, job_id: str, headers: dict[str, str], stop_after: int | None
) -> list[dict[str, Any]]:
    """Events off the stream; with `stop_after`, hang up after that many (a dropped link)."""
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "":
                if "event" in fields:
                    data = json.loads(fields["data"])
                    events.append({"id": int(fields["id"]), "type": fields["event"], "data": data})
                    if stop_after is not None and len(events) >= stop_after:
                        return events  # closing the response drops the connection
                fields = {}
            elif not line.startswith(":") and ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value.removeprefix(" ")
    return events


def test_a_client_joining_mid_job_gets_every_metrics_event_across_a_reconnect(
    service: httpx.Client,
) -> None:
    job_id = service.post("/v1/jobs", json=SPEC).json()["id"]

    def stored_metrics() -> list[dict[str, Any]]:
        page = service.get(f"/v1/jobs/{job_id}/events", params={"type": "metrics", "limit": 100})
        data: list[dict[str, Any]] = page.json()["data"]
        return data

    mid_job = wait_for(lambda: len(stored_metrics()) >= 20 and stored_metrics(), 60, "step 20")
    cursor = mid_job[9]["id"]  # joins after step 10, while the job trains
    stream = {"accept": "text/event-stream"}

    first = read_events(service, job_id, stream | {"last-event-id": str(cursor)}, stop_after=40)
    assert service.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # still mid-job
    rest = read_events(
        service, job_id, stream | {"last-event-id": str(first[-1]["id"])}, stop_after=None
    )

    received = first + rest
    ids = [event["id"] for event in received]
    assert ids == sorted(set(ids)), "out of order or repeated"
    assert received[-1]["type"] == "status" and received[-1]["data"]["status"] == "succeeded"
    steps = [event["data"]["step"] for event in received if event["type"] == "metrics"]
    assert steps == list(range(11, 121)), "a gap or a repeat in the metrics"
    everything = service.get(f"/v1/jobs/{job_id}/events", params={"after": cursor, "limit": 100})
    stored = everything.json()
    while stored["has_more"]:
        more = service.get(
            f"/v1/jobs/{job_id}/events", params={"after": stored["data"][-1]["id"], "limit": 100}
        ).json()
        stored = {"data": stored["data"] + more["data"], "has_more": more["has_more"]}
    assert ids == [event["id"] for event in stored["data"]]  # exactly what is stored


def test_the_stream_path_of_a_finished_job_replays_and_ends(
    service: httpx.Client, tmp_path: Path
) -> None:
    job_id = service.post("/v1/jobs", json=SPEC | {"max_steps": 5}).json()["id"]
    wait_for(lambda: service.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 60, "done")
    response = service.get(f"/v1/jobs/{job_id}/events/stream")
    assert response.status_code == 200
    assert response.text.count("event: metrics") == 5
    last_event = response.text.rstrip().rsplit("\n\n", 1)[-1]  # its lines in any order
    assert 'data: {"status":"succeeded"}' in last_event.splitlines()


def test_prometheus_step_metrics_move_when_a_job_runs_unwatched(service: httpx.Client) -> None:
    def series() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = service.get("/metrics").text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    before = series()
    steps_before = before.get(("trainjob_step_duration_seconds_count", ()), 0.0)
    succeeded_before = before[("trainjob_jobs", (("status", "succeeded"),))]
    job_id = service.post("/v1/jobs", json=SPEC | {"max_steps": 30}).json()["id"]
    wait_for(lambda: service.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 60, "done")

    def moved() -> bool:
        after = series()
        return (
            after.get(("trainjob_step_duration_seconds_count", ()), 0.0) >= steps_before + 20
            and after[("trainjob_jobs", (("status", "succeeded"),))] == succeeded_before + 1
        )

    # Nobody streams this job: the hub follows it for the metrics alone (the first
    # flush it hears of may be skipped, hence 20 of 30 steps).
    wait_for(moved, 15, "the step histogram and the job gauge to move")
