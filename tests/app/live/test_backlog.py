"""A page opening a long job asks its stream for a bounded backlog (`metrics_backlog`):
at most that many metrics events, evenly spaced, the newest exact, every other event in
full, then live ones; a client that does not ask still gets every stored event."""

from __future__ import annotations

import re
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import insert

from app.db import Database
from app.jobs.models import JobEvent
from app.live import stream
from app.live.backlog import sampled_events_after
from app.live.channels import ring
from tests.app.jobs.helpers import claim, create

from .test_stream import finish, finished_job, metric, parse_sse, write_steps

STEPS = 20_000
BACKLOG = 1000
DASHBOARD = Path(__file__).resolve().parents[3] / "app" / "dashboard" / "static" / "dashboard.js"


def store_a_long_run(database: Database, job_id: str) -> None:
    """20,000 steps' metrics events and a checkpoint event every 1,000, inserted at once."""
    rows: list[dict[str, Any]] = []
    for step in range(1, STEPS + 1):
        rows.append({"job_id": job_id, "type": "metrics", "data": metric(step)})
        if step % 1000 == 0:
            rows.append({"job_id": job_id, "type": "checkpoint", "data": {"step": step}})
    with database.session() as session:
        session.execute(insert(JobEvent), rows)
        session.commit()


def test_the_backlog_of_20000_steps_is_at_most_the_bound_evenly_spaced_newest_exact(
    client: TestClient, database: Database
) -> None:
    job_id = create(database)
    taken = claim(database, job_id, "w")
    store_a_long_run(database, job_id)
    finish(database, taken)

    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job_id}/events/stream?metrics_backlog={BACKLOG}")
    elapsed = time.monotonic() - started
    events = parse_sse(response.text)

    steps = [e["data"]["step"] for e in events if e["event"] == "metrics"]
    assert len(steps) <= BACKLOG
    tail = BACKLOG // 10
    assert steps[-tail:] == list(range(STEPS - tail + 1, STEPS + 1))  # the newest, exact
    head = steps[:-tail]
    assert head[0] == 1 and len({b - a for a, b in pairwise(head)}) == 1
    assert head[-1] > STEPS - tail - 2 * (head[1] - head[0])  # spread over the whole run
    checkpoints = [e["data"]["step"] for e in events if e["event"] == "checkpoint"]
    assert checkpoints == list(range(1000, STEPS + 1, 1000))  # other events in full
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"
    assert elapsed < 5.0, f"{elapsed:.1f} s for a bounded backlog"

    # Resuming after an event of the backlog: bounded again, nothing before it.
    cut = events[len(events) // 2]["id"]
    resumed = parse_sse(
        client.get(
            f"/v1/jobs/{job_id}/events/stream?metrics_backlog={BACKLOG}",
            headers={"last-event-id": str(cut)},
        ).text
    )
    assert resumed[0]["id"] > cut and len(resumed) <= BACKLOG + len(checkpoints) + 1
    assert resumed[-1]["data"]["status"] == "succeeded"


def test_a_short_backlog_is_sent_whole_and_live_events_follow_it(
    client: TestClient, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = create(database)
    taken = claim(database, job_id, "w")
    write_steps(database, taken, range(1, 30))
    rung = redis.Redis.from_url(str(client.app.state.settings.redis_url))  # type: ignore[attr-defined]
    # Steps written before the stream has read its backlog are backlog (thinned): the live
    # ones are written once it has, which the stream's read of the backlog tells.
    backlog_read = threading.Event()

    def sampled_then_tell(*args: Any, **kwargs: Any) -> Any:
        try:
            return sampled_events_after(*args, **kwargs)
        finally:
            backlog_read.set()

    monkeypatch.setattr(stream, "sampled_events_after", sampled_then_tell)

    def train_on() -> None:
        if backlog_read.wait(60):
            write_steps(database, taken, range(30, 40))
        finish(database, taken)  # ends the stream either way; the assertions tell which
        ring(rung, [job_id])

    writer = threading.Thread(target=train_on)
    writer.start()
    response = client.get(f"/v1/jobs/{job_id}/events/stream?metrics_backlog=10")
    writer.join()
    rung.close()
    assert backlog_read.is_set(), "the stream never read its backlog"

    events = parse_sse(response.text)
    steps = [e["data"]["step"] for e in events if e["event"] == "metrics"]
    # 29 stored: thinned to 10 (1, 5, … and the newest exact); the live 30–39 all follow.
    assert len([s for s in steps if s < 30]) <= 10 and steps[-10:] == list(range(30, 40))
    assert 29 in steps and events[-1]["data"]["status"] == "succeeded"


def test_a_plain_stream_still_replays_every_stored_step(
    client: TestClient, database: Database
) -> None:
    job_id = finished_job(database, range(1, 40))
    events = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream").text)
    assert [e["data"]["step"] for e in events if e["event"] == "metrics"] == list(range(1, 40))


def test_the_job_page_opens_its_stream_with_a_bounded_backlog() -> None:
    source = DASHBOARD.read_text()
    bound = re.search(r"const METRICS_BACKLOG = (\d+);", source)
    assert bound is not None and 100 <= int(bound.group(1)) <= 5000
    assert "/events/stream?metrics_backlog=${METRICS_BACKLOG}" in source
    assert 'openEventStream(jobPath(id, "/events/stream")' not in source


def test_a_backlog_out_of_range_is_a_422_envelope(client: TestClient, database: Database) -> None:
    job_id = create(database)
    finish(database, claim(database, job_id, "w"))
    response = client.get(f"/v1/jobs/{job_id}/events/stream?metrics_backlog=1")
    assert response.status_code == 422 and "error" in response.json()
