"""Experiment tracking through the whole service: a real worker logs a job's params,
per-step metrics and final weights to a local MLflow tracking server (a server that is
down, and a LoRA job's adapter: tests/worker/tracking/test_job.py).

The MLflow server (`mlflow server` on SQLite, its artifacts proxied into a directory)
takes longer to start than anything else here: it boots while the API and the worker do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from safetensors.torch import load as load_safetensors

from tests.conftest import StartService
from tests.processes import (
    free_port,
    kill_group,
    service_env,
    start,
    wait_for_status,
    wait_until_ready,
)
from worker.tracking.mlflow_backend import HTTP_LIMITS, JOB_ID_TAG, MlflowBackend

MLFLOW = str(Path(sys.executable).parent / "mlflow")
FINISHED = {"succeeded", "failed", "cancelled"}
TRACKED = {"tracking": {"mlflow": {"experiment": "trainjob-tests", "run_name": "digits"}}}
MLP: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 2,
    "max_steps": 6,
    "eval_every": 3,
    "device": "cpu",
}


@dataclass
class MlflowServer:
    process: Any
    url: str
    log: Path

    def ready(self) -> MlflowClient:
        wait_until_ready(self.url, self.process, self.log, timeout=120, path="/health")
        return MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Started, not waited for: `ready` waits."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
    log = folder / "mlflow.log"
    # No job runner beside it (MLflow's own jobs, for its GenAI features): fewer processes
    # to start on a busy machine.
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = start(command, service_env() | quiet, log)
    try:
        yield MlflowServer(process, f"http://127.0.0.1:{port}", log)
    finally:
        kill_group(process)  # nothing of it is kept: no need to wait for a clean stop


def succeeded(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = wait_for_status(client, response.json()["id"], FINISHED, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    return job


def warnings_of(client: httpx.Client, job_id: str) -> list[str]:
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    return [event["data"]["message"] for event in events if event["type"] == "warning"]


@pytest.fixture(scope="module")
def tracked_jobs(
    start_service: StartService, mlflow_server: MlflowServer
) -> Iterator[tuple[httpx.Client, MlflowClient, dict[str, dict[str, Any]]]]:
    with start_service("tracking", mlflow_tracking_uri=mlflow_server.url) as client:
        mlflow = mlflow_server.ready()
        yield client, mlflow, {"mlp": succeeded(client, MLP | TRACKED)}


def run_of(mlflow: MlflowClient, job_id: str) -> Any:
    experiment = mlflow.get_experiment_by_name("trainjob-tests")
    assert experiment is not None
    [run] = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`trainjob.job_id` = '{job_id}'"
    )
    return run


def test_a_job_logs_its_params_metrics_and_weights_to_mlflow(
    tracked_jobs: tuple[httpx.Client, MlflowClient, dict[str, dict[str, Any]]], tmp_path: Path
) -> None:
    client, mlflow, jobs = tracked_jobs
    job = jobs["mlp"]
    assert warnings_of(client, job["id"]) == []
    run = run_of(mlflow, job["id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "digits"
    assert run.data.tags["trainjob.tenant"] == "default"
    params = run.data.params
    assert params["model.type"] == "mlp" and params["model.hidden_sizes"] == "[8]"
    assert params["max_steps"] == "6" and params["batch_size"] == "16"
    assert "tracking.mlflow.experiment" not in params
    losses = mlflow.get_metric_history(run.info.run_id, "loss")
    assert sorted(metric.step for metric in losses) == [1, 2, 3, 4, 5, 6]
    stored = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    assert [metric.value for metric in sorted(losses, key=lambda m: m.step)] == [
        row["loss"] for row in stored
    ]
    evaluated = mlflow.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(metric.step for metric in evaluated) == [3, 6]
    assert {"lr", "grad_norm", "tokens_seen", "samples_seen"} <= set(run.data.metrics)
    # The final weights: the bytes the weights download serves.
    local = Path(mlflow.download_artifacts(run.info.run_id, "weights", str(tmp_path)))
    uploaded = (local / "model.safetensors").read_bytes()
    assert uploaded == client.get(f"/v1/jobs/{job['id']}/weights").content
    assert load_safetensors(uploaded)


def test_a_resumed_attempt_continues_the_job_s_run_after_its_last_step(
    tracked_jobs: tuple[httpx.Client, MlflowClient, dict[str, dict[str, Any]]],
    mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a later attempt of the job (its worker lost, the job paused or preempted)
    finds on the real server: the same run, by its job id tag, the steps and the params
    it holds; the run is running again. (Skipping those steps: tests/worker/tracking.)"""
    _, mlflow, jobs = tracked_jobs
    job_id = jobs["mlp"]["id"]
    for name in HTTP_LIMITS:  # the backend sets them for its process: here, this test's
        monkeypatch.delenv(name, raising=False)
    backend = MlflowBackend(mlflow_server.url)
    opened = backend.open_run(
        experiment="trainjob-tests", run_name="ignored", tags={JOB_ID_TAG: job_id}
    )
    run = run_of(mlflow, job_id)
    assert opened.run_id == run.info.run_id
    assert opened.last_step == 6
    assert {"model.type", "max_steps", "batch_size"} <= opened.param_keys
    assert run.info.status == "RUNNING"
