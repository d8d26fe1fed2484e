"""The readable summaries of `trainjob status`, from job objects as the server sends them."""

from __future__ import annotations

from typing import Any

from cli.output import job_summary

JOB: dict[str, Any] = {
    "id": "job_1",
    "name": None,
    "status": "queued",
    "priority": 900,
    "progress": {"step": 0, "max_steps": 50},
    "metrics": None,
    "batch_size": 8,
    "micro_batch_size": 8,
    "accumulation_steps": 1,
    "attempts": 0,
    "max_attempts": 3,
    "error": None,
    "queue_position": None,
    "estimated_finish": None,
}


def lines(job: dict[str, Any]) -> list[str]:
    return [line.strip() for line in job_summary(job).splitlines()]


def test_a_queued_job_shows_its_priority_and_how_many_run_before_it() -> None:
    assert "priority  900" in lines(JOB)
    assert "queue     3 jobs run before it" in lines({**JOB, "queue_position": 3})
    assert "queue     next" in lines({**JOB, "queue_position": 0})
    assert not any(line.startswith("eta") for line in lines({**JOB, "queue_position": 0}))


def test_a_running_job_shows_its_estimated_finish_when_known() -> None:
    running = {**JOB, "status": "running", "progress": {"step": 10, "max_steps": 50}}
    assert not any(line.startswith(("eta", "queue")) for line in lines(running))
    estimated = {**running, "estimated_finish": "2026-12-06T20:01:02.5+00:00"}
    assert "eta       2026-12-06 20:01:02 UTC" in lines(estimated)
