"""The Server-Sent Events stream of a job, against the real database and Redis.

Events are written the way a worker writes them (fenced progress, then a ring on the
job's channel) from a thread while the stream is open; the stream must deliver them
in order, once each, and end after the terminal status event.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.db import Database
from app.jobs import runs
from app.live.channels import ring
from app.main import create_app
from app.settings import Settings
from tests.app.jobs.helpers import claim, create
from tests.conftest import REDIS_URL

SSE = {"accept": "text/event-stream"}


def parse_sse(body: str) -> list[dict[str, Any]]:
    """Events of an SSE body as {"id", "event", "data"}; comments and retry are skipped."""
    events = []
    for block in body.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, value = line.split(":", 1)
            fields[name] = value.removeprefix(" ")
        if "event" in fields:
            events.append(
                {
                    "id": int(fields["id"]),
                    "event": fields["event"],
                    "data": json.loads(fields["data"]),
                }
            )
    return events


def metric(step: int) -> dict[str, Any]:
    return {"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": 0.5,
            "samples_per_sec": 100.0, "micro_batch_size": 8, "time": time.time()}  # fmt: skip


def write_steps(database: Database, taken: runs.Claim, steps: range) -> None:
    with database.session() as session:
        runs.record_progress(
            session,
            claim=taken,
            job_values={"step": steps[-1]},
            metrics=[metric(step) for step in steps],
            events=[],
        )
        session.commit()


def finish(database: Database, taken: runs.Claim) -> None:
    with database.session() as session:
        runs.finish_job(session, claim=taken, status="succeeded")
        session.commit()


def finished_job(database: Database, steps: range) -> str:
    """A job that trained `steps` and succeeded."""
    job_id = create(database)
    taken = claim(database, job_id, "w")
    write_steps(database, taken, steps)
    finish(database, taken)
    return job_id


@pytest.fixture
def rung() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_a_finished_job_streams_its_stored_events_and_ends(
    client: TestClient, database: Database
) -> None:
    job_id = finished_job(database, range(1, 4))

    response = client.get(f"/v1/jobs/{job_id}/events", headers=SSE)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    stored = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [(e["id"], e["event"]) for e in events] == [(e["id"], e["type"]) for e in stored]
    assert [e["data"]["step"] for e in events if e["event"] == "metrics"] == [1, 2, 3]
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"


def test_last_event_id_resumes_after_that_event_and_a_cursor_past_the_end_ends(
    client: TestClient, database: Database
) -> None:
    job_id = finished_job(database, range(1, 6))
    everything = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream").text)
    cut = everything[3]["id"]

    resumed = parse_sse(
        client.get(f"/v1/jobs/{job_id}/events/stream", headers={"last-event-id": str(cut)}).text
    )
    by_query = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream?after={cut}").text)

    assert resumed == everything[4:] and by_query == everything[4:]
    past_the_end = client.get(
        f"/v1/jobs/{job_id}/events/stream", headers={"last-event-id": str(everything[-1]["id"])}
    )
    assert parse_sse(past_the_end.text) == []


def test_live_events_follow_the_stored_ones_in_order_once_each(
    client: TestClient, database: Database, rung: redis.Redis
) -> None:
    job_id = create(database)
    taken = claim(database, job_id, "w")
    write_steps(database, taken, range(1, 3))

    def train_on() -> None:
        # Waits until the stream below is subscribed, then writes as a worker would.
        deadline = time.monotonic() + 10
        while client.app.state.hub.watched_jobs == 0 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        for first in range(3, 30, 3):
            write_steps(database, taken, range(first, first + 3))
            ring(rung, [job_id])
        finish(database, taken)
        ring(rung, [job_id])

    writer = threading.Thread(target=train_on)
    writer.start()
    response = client.get(f"/v1/jobs/{job_id}/events", headers=SSE)
    writer.join()

    events = parse_sse(response.text)
    assert [e["data"]["step"] for e in events if e["event"] == "metrics"] == list(range(1, 30))
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))  # in order, no repeats
    assert events[-1]["data"]["status"] == "succeeded"


def test_an_unknown_job_is_a_404_envelope_not_a_stream(client: TestClient) -> None:
    response = client.get("/v1/jobs/job_000000000000000000000000/events", headers=SSE)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_an_event_is_one_sse_block_with_its_data_as_compact_json(
    client: TestClient, database: Database
) -> None:
    job_id = finished_job(database, range(1, 2))
    first = client.get(f"/v1/jobs/{job_id}/events").json()["data"][0]
    body = client.get(f"/v1/jobs/{job_id}/events/stream").text
    assert body.startswith("retry: 2000\n\n")
    assert f'event: status\ndata: {{"status":"queued"}}\nid: {first["id"]}\n\n' in body


def test_an_idle_stream_sends_keep_alive_comments(
    settings: Settings, database: Database, rung: redis.Redis
) -> None:
    quick = settings.model_copy(
        update={"stream_keepalive_seconds": 0.05, "reaper_interval_seconds": 0}
    )
    job_id = create(database)
    taken = claim(database, job_id, "w")
    body, finished = "", False
    path = f"/v1/jobs/{job_id}/events/stream"
    with TestClient(create_app(quick)) as client, client.stream("GET", path) as response:
        for text in response.iter_text():
            body += text
            # Idle on purpose until two keep-alives came: then the job finishes.
            if body.count(": keep-alive\n\n") >= 2 and not finished:
                finish(database, taken)
                ring(rung, [job_id])
                finished = True
    assert body.count(": keep-alive\n\n") >= 2
    assert parse_sse(body)[-1]["data"]["status"] == "succeeded"
