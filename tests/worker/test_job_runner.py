"""The worker's run of a job on uploaded files, in this process on Postgres and SQLite:
it waits while a file is validating, fails on an invalid file, and otherwise trains on
the file's bytes fetched into a directory of its own."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from sqlalchemy import update

from app.db import Database
from app.files.models import DataFile
from app.files.usage import record_validation
from app.jobs import service as jobs_service
from app.jobs.models import JobMetric
from app.settings import Settings
from tests.app.files.stored_files import (
    TEXT_STATS,
    add_file,
    create_job,
    events,
    load_job,
    text_job_spec,
)
from tests.app.jobs.helpers import set_enqueued_at
from worker import job_runner
from worker.job_runner import run_job

TEXT = "".join(
    f'{{"text": "row {i}: the quick brown fox jumps over the lazy dog"}}\n' for i in range(12)
).encode()


def never_enqueue(job_id: str) -> bool:
    raise AssertionError(f"job {job_id} was handed back")


@pytest.fixture
def database(own_database: Database) -> Database:
    """run_job claims the best queued job of its database: one of this test's own."""
    return own_database


@pytest.fixture
def run_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the run's temporary directories go."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def set_status(database: Database, file_id: str, status: str, errors: list[str]) -> None:
    with database.session() as session:
        values = {"status": status, "errors": errors, "kind": "text", "stats": TEXT_STATS}
        session.execute(update(DataFile).where(DataFile.id == file_id).values(**values))
        session.commit()


def test_a_job_whose_file_is_validating_is_left_queued_for_the_validation_to_send(
    database: Database, settings: Settings
) -> None:
    file_id = add_file(database, content=TEXT)
    job_id = create_job(database, text_job_spec(file_id))
    set_enqueued_at(database, job_id, 0)  # as if a message reached a worker after all

    run_job(job_id, settings, worker="w1", enqueue=never_enqueue)

    job = load_job(database, job_id)
    assert (job.status, job.attempts, job.worker) == ("queued", 0, None)
    with database.session() as session:
        recorded = record_validation(
            session, file_id=file_id, status="valid", kind="text", errors=[], stats=TEXT_STATS
        )
        session.commit()
    assert recorded.to_send == [job_id]


def test_a_job_whose_file_turned_out_invalid_fails_invalid_data(
    database: Database, settings: Settings
) -> None:
    file_id = add_file(database, content=TEXT)
    job_id = create_job(database, text_job_spec(file_id))
    set_status(database, file_id, "invalid", ["line 7: missing 'text'"])

    run_job(job_id, settings, worker="w1", enqueue=never_enqueue)

    job = load_job(database, job_id)
    assert (job.status, job.error_type, job.attempts) == ("failed", "invalid_data", 0)
    assert job.error_message is not None and "line 7: missing 'text'" in job.error_message
    assert events(database, job_id)[-1][1]["status"] == "failed"


def test_a_job_on_a_valid_file_trains_on_its_bytes_in_a_directory_removed_after(
    database: Database, settings: Settings, run_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[Path] = []

    class RecordedRunFiles(job_runner.RunFiles):
        def __call__(self, file_id: str) -> Path:
            path = super().__call__(file_id)
            fetched.append(path)
            return path

    monkeypatch.setattr(job_runner, "RunFiles", RecordedRunFiles)
    file_id = add_file(database, content=TEXT)
    held_out = add_file(database, content=TEXT[: len(TEXT) // 3])
    spec = text_job_spec(file_id, validation_file_id=held_out) | {"eval_every": 1}
    job_id = create_job(database, spec)
    set_status(database, file_id, "valid", [])
    set_status(database, held_out, "valid", [])

    run_job(job_id, settings, worker="w1", enqueue=never_enqueue)

    job = load_job(database, job_id)
    assert job.status == "succeeded", job.error_message
    assert job.step == 3 and job.tokens_seen > 0
    with database.session() as session:
        metrics, _ = jobs_service.job_rows(session, JobMetric.step, None, job_id=job_id, limit=10)
    assert all(metric.extra.get("eval_loss") is not None for metric in metrics)
    assert sorted(path.stem for path in fetched) == sorted([file_id, held_out])
    assert all(path.parent.parent == run_tmp for path in fetched)
    assert not any(path.parent.exists() for path in fetched)


BUILT_IN_SPEC = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "synthetic-classification", "n_samples": 64, "n_features": 4},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 2,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "device": "cpu",
}


def test_out_of_memory_in_the_optimizer_step_fails_the_job_out_of_memory_saying_why(
    database: Database, settings: Settings
) -> None:
    job_id = create_job(database, BUILT_IN_SPEC)

    run_job(
        job_id,
        settings.model_copy(update={"test_faults": "oom_step"}),
        worker="w1",
        enqueue=never_enqueue,
    )

    job = load_job(database, job_id)
    assert (job.status, job.error_type) == ("failed", "out_of_memory")
    assert job.error_message is not None
    assert "optimizer state does not fit" in job.error_message
    assert "Micro-batching cannot help" in job.error_message


def test_out_of_memory_outside_the_engine_s_backoff_fails_out_of_memory_not_internal(
    database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def model_does_not_fit(*_: object, **__: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(job_runner, "train", model_does_not_fit)
    job_id = create_job(database, BUILT_IN_SPEC)

    run_job(job_id, settings, worker="w1", enqueue=never_enqueue)

    job = load_job(database, job_id)
    assert (job.status, job.error_type) == ("failed", "out_of_memory")
    assert job.error_message is not None and "Tried to allocate 2.00 GiB" in job.error_message
    assert events(database, job_id)[-1][1]["error"]["type"] == "out_of_memory"


def test_a_pretrained_model_over_the_worker_s_parameter_bound_fails_invalid_spec(
    database: Database, settings: Settings, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    models = tmp_path / "models"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=96, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(models / "tiny-gpt2")
    spec = {
        **BUILT_IN_SPEC,
        "model": {"type": "hf-causal-lm", "pretrained": str(models / "tiny-gpt2")},
        "dataset": {"type": "tiny-text", "min_length": 2, "max_length": 33},
    }
    job_id = create_job(database, spec)
    run_job(
        job_id,
        settings.model_copy(update={"hf_model_dirs": [models], "hf_max_parameters": 1000}),
        worker="w1",
        enqueue=never_enqueue,
    )

    job = load_job(database, job_id)
    assert (job.status, job.error_type) == ("failed", "invalid_spec")
    assert job.error_message is not None
    assert "parameters; the maximum is 1,000" in job.error_message
