"""A tracked job run by the worker in this process: against a tracking server that is
not there it succeeds as an untracked one does, in about the same time, with one
warning event; a LoRA job uploads its adapter (a live server:
tests/test_tracking_end_to_end.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from app.db import Database
from app.settings import Settings
from tests.app.files.stored_files import create_job, events, load_job
from tests.processes import free_port
from tests.worker.tracking.test_tracker import FakeServer
from worker.job_runner import run_job
from worker.tracking import job as tracking_job
from worker.tracking.mlflow_backend import HTTP_LIMITS, LAST_STEP_TAG

SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "synthetic-classification", "n_samples": 64, "n_features": 4},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 5,
    "device": "cpu",
}
TRACKED = SPEC | {"tracking": {"mlflow": {"experiment": "e"}}}


def never_enqueue(job_id: str) -> bool:
    raise AssertionError(f"job {job_id} was handed back")


@pytest.fixture
def database(own_postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    """run_job claims the best queued job of its database: one of this test's own (on
    PostgreSQL only: tracking reads nothing a database kind changes). The MLflow
    client's limits the tracker sets are this test's only."""
    for name in HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    database = Database(own_postgres_url)
    yield database
    database.dispose()


def warnings(database: Database, job_id: str) -> list[str]:
    return [data["message"] for kind, data in events(database, job_id) if kind == "warning"]


def run(database: Database, settings: Settings, spec: dict[str, Any]) -> str:
    job_id = create_job(database, spec)
    run_job(job_id, settings, worker="w1", enqueue=never_enqueue)
    job = load_job(database, job_id)
    assert (job.status, job.step) == ("succeeded", 5), job.error_message
    return job_id


def test_a_tracking_server_that_is_down_costs_one_warning_and_no_time(
    database: Database, settings: Settings
) -> None:
    nowhere = f"http://user:secret@127.0.0.1:{free_port()}"  # nothing listens there
    settings = settings.model_copy(update={"mlflow_tracking_uri": nowhere})
    untracked = run(database, settings, SPEC)
    tracked = run(database, settings, TRACKED)

    assert warnings(database, untracked) == []
    [warning] = warnings(database, tracked)
    assert warning.startswith("experiment tracking stopped for this run (the job goes on)")
    assert "secret" not in warning and "<tracking server>" in warning
    # MLflow's own retries would take minutes; its import takes a few seconds.
    runtimes = [load_job(database, job_id).runtime_seconds for job_id in (untracked, tracked)]
    assert runtimes[1] < runtimes[0] + 10, runtimes


def test_a_worker_without_the_tracking_setting_trains_with_one_warning_naming_it(
    database: Database, settings: Settings
) -> None:
    job_id = run(database, settings.model_copy(update={"mlflow_tracking_uri": None}), TRACKED)
    [warning] = warnings(database, job_id)
    assert "TRAINJOB_MLFLOW_TRACKING_URI is unset on this worker" in warning


def test_a_tracked_lora_job_uploads_its_adapter_as_peft_saves_it(
    database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeServer()
    monkeypatch.setattr(tracking_job, "_connect", lambda uri: server)
    spec = TRACKED | {
        "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "dataset": {"type": "tiny-text", "min_length": 8, "max_length": 16},
        "lora": {"r": 2, "alpha": 4},
        "name": "adapter",
    }
    job_id = run(database, settings.model_copy(update={"mlflow_tracking_uri": "unused"}), spec)

    assert warnings(database, job_id) == []
    assert server.uploaded == ["adapter_config.json", "adapter_model.safetensors"]
    assert server.status == "FINISHED"
    assert server.run_name == "adapter"  # the job's name, as the spec gives no run_name
    assert server.tags == {"trainjob.job_id": job_id, "trainjob.tenant": "default",
                           LAST_STEP_TAG: "5"}  # fmt: skip
    assert sorted({point.step for point in server.points}) == [1, 2, 3, 4, 5]
    assert server.params["lora.r"] == "2"
