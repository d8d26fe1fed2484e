"""A training run written through the ProgressWriter into the real database, with a stop
and a resume as the job runner does them: evaluations reach the event stream, each
checkpoint remembers the last eval_loss, and `keep_checkpoints` leaves exactly the
checkpoints its policy names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient

from app.blobs import default_store
from app.checkpoints.models import Checkpoint
from app.db import Database
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.spec import JobSpec
from app.live.channels import job_channel
from app.main import create_app
from app.settings import Settings
from tests.app.live.test_stream import parse_sse
from tests.conftest import REDIS_URL
from worker.engine.trainer import Callbacks, StepMetrics, train
from worker.job_runner import latest_checkpoint
from worker.lease import LeaseKeeper
from worker.live import LivePublisher
from worker.progress_writer import ProgressWriter

# SGD at this rate overshoots: the eval loss falls to its lowest at step 6, then rises,
# so the best checkpoint is not one of the newest.
SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "synthetic-classification", "n_samples": 96, "n_features": 6},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 12,
    "optimizer": {"type": "sgd", "lr": 1.0},
    "eval_every": 2,
    "checkpoint_every": 1,
    "keep_checkpoints": {"last": 2, "best": 1},
    "device": "cpu",
}
STOP_AFTER = 6  # an eval step: the resumed run's first checkpoint (7) must still know it


def expected_survivors(eval_by_step: dict[int, float], train_by_step: dict[int, float]) -> set[int]:
    """The policy replayed by hand, save by save: the two newest, and the lowest eval_loss
    of the last evaluation at or before each step (train loss before any), newer on a tie."""
    alive: list[int] = []
    for step in range(1, SPEC["max_steps"] + 1):
        alive.append(step)
        evals = {s: max((e for e in eval_by_step if e <= s), default=None) for s in alive}
        scored = {s: eval_by_step[e] for s, e in evals.items() if e is not None}
        if not scored:
            scored = {s: train_by_step[s] for s in alive}
        best = min(scored, key=lambda s: (scored[s], -s))
        alive = [s for s in alive if s in sorted(alive)[-2:] or s == best]
    return set(alive)


def claimed_job_writer(
    database: Database, checkpoint_dir: Path | None, *, flush_seconds: float
) -> tuple[runs.Claim, LivePublisher, ProgressWriter]:
    """A job of SPEC claimed by worker "w", and the progress writer of its run."""
    with database.session() as session:
        job_id = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC)).id
        claim = runs.claim_job(session, job_id=job_id, worker="w", lease_timeout=60)
        session.commit()
    assert claim is not None
    keeper = LeaseKeeper(database, claim, heartbeat_seconds=60, max_runtime_seconds=None)
    publisher = LivePublisher(REDIS_URL)
    writer = ProgressWriter(
        database, claim, default_store(checkpoint_dir), publisher, keeper,
        flush_seconds=flush_seconds, give_up_seconds=5.0,
    )  # fmt: skip
    return claim, publisher, writer


@pytest.fixture(autouse=True)
def _one_thread_for_determinism() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("storage", ["database", "directory"])
def test_a_stopped_and_resumed_run_keeps_exactly_the_policy_s_checkpoints(
    database: Database, settings: Settings, tmp_path: Path, storage: str
) -> None:
    checkpoint_dir = tmp_path / "checkpoints" if storage == "directory" else None
    settings = settings.model_copy(update={"checkpoint_dir": checkpoint_dir})
    spec = JobSpec.model_validate(SPEC)
    claim, publisher, writer = claimed_job_writer(database, checkpoint_dir, flush_seconds=0.0)
    job_id = claim.job_id
    steps: list[StepMetrics] = []

    def on_step(metrics: StepMetrics) -> None:
        steps.append(metrics)
        writer.on_step(metrics)

    def callbacks(stop_after: int | None) -> Callbacks:
        def should_stop() -> str | None:
            stop = stop_after is not None and bool(steps) and steps[-1].step == stop_after
            return "shutdown" if stop else writer.should_stop()

        return Callbacks(
            writer.on_start, on_step, writer.on_event, writer.on_checkpoint, should_stop
        )

    first = train(spec, callbacks(STOP_AFTER), resume=latest_checkpoint(database, settings, job_id))
    assert (first.status, first.step) == ("stopped", STOP_AFTER)
    resume = latest_checkpoint(database, settings, job_id)
    assert resume is not None and resume.step == STOP_AFTER
    second = train(spec, callbacks(None), resume=resume)
    assert (second.status, second.step) == ("completed", SPEC["max_steps"])
    writer.flush(required=True)
    with database.session() as session:
        runs.finish_job(session, claim=claim, status="succeeded")
        session.commit()
    publisher.close()

    eval_by_step = {m.step: m.eval_loss for m in steps if m.eval_loss is not None}
    assert sorted(eval_by_step) == [2, 4, 6, 8, 10, 12]
    expected = expected_survivors(eval_by_step, {m.step: m.loss for m in steps})
    assert expected == {7, 11, 12}  # the best (6's eval, tied, newer step) is not a newest
    with database.session() as session:
        kept, _ = jobs_service.job_rows(session, Checkpoint.step, None, job_id=job_id, limit=100)
        last_eval = {step: eval_by_step[step - step % 2] for step in range(2, 13)}
        assert {row.step: row.eval_loss for row in kept} == {s: last_eval[s] for s in expected}
    if checkpoint_dir is not None:
        on_disk = sorted(path.name for path in (checkpoint_dir / job_id).iterdir())
        assert on_disk == [f"step-{step:07d}" for step in sorted(expected)]

    with TestClient(create_app(settings)) as client:
        streamed = parse_sse(client.get(f"/v1/jobs/{job_id}/events/stream").text)
        listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    streamed_evals = {
        event["data"]["step"]: event["data"]["eval_loss"]
        for event in streamed
        if event["event"] == "metrics" and event["data"]["eval_loss"] is not None
    }
    assert streamed_evals == eval_by_step
    checkpoint_events = [event["data"] for event in streamed if event["event"] == "checkpoint"]
    assert [(c["step"], c["eval_loss"]) for c in checkpoint_events] == [
        (step, last_eval.get(step)) for step in range(1, 13)
    ]
    assert [(c["step"], c["eval_loss"]) for c in listed] == [
        (step, last_eval[step]) for step in sorted(expected)
    ]


def test_a_flush_publishes_its_whole_batch_once_on_the_job_s_channel(database: Database) -> None:
    claim, publisher, writer = claimed_job_writer(database, None, flush_seconds=3600.0)
    listener = redis.Redis.from_url(REDIS_URL)
    pubsub = listener.pubsub()
    pubsub.subscribe(job_channel(claim.job_id))
    assert pubsub.get_message(timeout=5.0)["type"] == "subscribe"  # type: ignore[index]
    try:
        for step in range(1, 6):
            writer.on_step(
                StepMetrics(step=step, epoch=0, loss=1.0, lr=0.1, grad_norm=0.5,
                            samples_seen=8 * step, tokens_seen=0, samples_per_sec=80.0,
                            step_seconds=0.1, micro_batch_size=4, accumulation_steps=2,
                            window_samples=8, skipped=False, time=0.0)
            )  # fmt: skip
        writer.on_event("warning", {"message": "hello"})
        writer.flush(required=True)
        messages = []
        while (message := pubsub.get_message(timeout=1.0)) is not None:
            messages.append(message)
    finally:
        publisher.close()
        pubsub.close()
        listener.close()

    assert len(messages) == 1  # one PUBLISH for the flush, not one per event
    batch = json.loads(messages[0]["data"])
    assert [event["data"]["step"] for event in batch if event["type"] == "metrics"] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert batch[-1] == {"type": "warning", "data": {"message": "hello"}}
