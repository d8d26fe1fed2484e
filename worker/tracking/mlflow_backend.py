"""The MLflow calls a tracked run makes, through MlflowClient (the `trainjob[mlflow]` extra).

The only module that imports mlflow, and only when a tracked job's tracking thread
builds it: mlflow takes seconds to import, and most jobs never ask for it. Every call is
an HTTP request to the operator's tracking server, bounded (see `_bound_http_calls`) so
that a server that is down costs seconds, never the minutes of MLflow's own retries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

JOB_ID_TAG = "trainjob.job_id"
TENANT_TAG = "trainjob.tenant"
# The last step whose metrics the run holds: a resumed job logs only the steps after it
# (steps re-run from a checkpoint are bit-identical), so that each step is logged once.
LAST_STEP_TAG = "trainjob.last_step"
# MLflow's limits per log_batch request (mlflow/utils/validation.py).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
# A finished run's statuses; "SCHEDULED" (handed back, to resume) is set with update_run.
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})

# What MLflow's HTTP client does unless the worker's environment says otherwise: its
# defaults (a 120 s timeout, 7 retries with exponential backoff) would keep a tracked job
# waiting minutes on a server that is down.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    # A training worker does not report its use of MLflow to MLflow's maintainers.
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
_SAFE_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class MetricPoint:
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True)
class OpenedRun:
    run_id: str
    last_step: int  # 0 for a new run
    param_keys: frozenset[str]  # what an earlier attempt logged (MLflow params are immutable)


def _bound_http_calls() -> None:
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)  # an operator's own value wins


class MlflowBackend:
    """A tracking server's runs, by MlflowClient. Raises whatever MLflow raises."""

    def __init__(self, tracking_uri: str) -> None:
        _bound_http_calls()
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)

    def open_run(self, *, experiment: str, run_name: str, tags: dict[str, str]) -> OpenedRun:
        """The job's run in `experiment`: the one an earlier attempt started (by its job id
        tag), marked running again, else a new one with `tags`."""
        experiment_id = self._experiment_id(experiment)
        job_id = tags[JOB_ID_TAG]
        if not _SAFE_JOB_ID.fullmatch(job_id):  # it goes into a filter string
            raise ValueError(f"unexpected job id {job_id!r}")
        earlier = self._client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if earlier:
            run = earlier[0]
            self._client.update_run(run.info.run_id, status="RUNNING")
            return OpenedRun(
                run.info.run_id,
                int(run.data.tags.get(LAST_STEP_TAG, "0")),
                frozenset(run.data.params),
            )
        run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        return OpenedRun(run.info.run_id, 0, frozenset())

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return self._client.create_experiment(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = self._client.get_experiment_by_name(name)  # another job created it
            if found is None:
                raise
            return str(found.experiment_id)

    def log(
        self,
        run_id: str,
        *,
        metrics: Sequence[MetricPoint] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Metrics and params in as few requests as MLflow's limits allow; `tags` with the
        last one, so that a tag written says the metrics before it are in."""
        from mlflow.entities import Metric, Param, RunTag

        items = list((params or {}).items())
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            pairs = items[start : start + MAX_PARAMS_PER_BATCH]
            self._client.log_batch(run_id, params=[Param(key, value) for key, value in pairs])
        chunks = [
            metrics[start : start + MAX_METRICS_PER_BATCH]
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH)
        ] or [()]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            self._client.log_batch(
                run_id,
                metrics=[
                    Metric(point.key, point.value, point.timestamp_ms, point.step)
                    for point in chunk
                ],
                tags=[RunTag(key, value) for key, value in (tags or {}).items()] if last else [],
            )

    def upload(self, run_id: str, directory: Path, artifact_path: str) -> None:
        self._client.log_artifacts(run_id, str(directory), artifact_path)

    def set_status(self, run_id: str, status: str) -> None:
        if status in TERMINAL_STATUSES:
            self._client.set_terminated(run_id, status)  # with the end time
        else:
            self._client.update_run(run_id, status=status)
