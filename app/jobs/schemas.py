"""What the API returns for jobs, their metrics and events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AliasPath, BaseModel, ConfigDict, Field, field_serializer, model_validator

JobStatus = Literal[
    "queued", "running", "cancelling", "pausing", "paused", "succeeded", "failed", "cancelled"
]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def as_utc(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


class _TimesInUtc(BaseModel):
    """A response model: read from a row (`model_validate(row)`), times written in UTC."""

    model_config = ConfigDict(from_attributes=True)

    @field_serializer("*", when_used="json")
    def _utc(self, value: Any) -> Any:
        return as_utc(value).isoformat() if isinstance(value, datetime) else value  # type: ignore[union-attr]


class JobProgress(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    max_steps: int | None
    epoch: int
    samples_seen: int
    tokens_seen: int
    # Samples in the latest optimizer step's window: below batch_size when that was an
    # epoch's short last window (the job's micro_batch_size × accumulation_steps stay
    # the full window's split). None before the first step.
    # The latest step's metrics hold it (stored with the step, so no column of its own).
    last_window_samples: int | None = Field(
        None, validation_alias=AliasPath("metrics", "window_samples")
    )


class JobError(BaseModel):
    type: str
    message: str


class JobRow(_TimesInUtc):
    """A response model read from a job's row, an ORM object or a read's row alike
    (app/reads.py): the row's counters are its `progress`, its two error columns its
    `error`, and its other fields the row's columns of the same names."""

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, job: Any) -> Any:
        if isinstance(job, dict):
            return job
        error = job.error_type and {"type": job.error_type, "message": job.error_message or ""}
        columns = {name: getattr(job, name, None) for name in [*cls.model_fields, "metrics"]}
        return columns | {"progress": job, "error": error}


class JobPublic(JobRow):
    id: str
    name: str | None
    tenant: str
    status: JobStatus
    spec: dict[str, Any]
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    devices: int
    nodes: int
    priority: int
    preemptible: bool
    progress: JobProgress
    metrics: dict[str, Any] | None
    error: JobError | None
    attempts: int
    max_attempts: int
    worker: str | None
    runtime_seconds: float
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # While queued: how many jobs would run before it now (app/jobs/scheduling.py).
    queue_position: int | None = None
    # While it runs, once some steps have: when it should finish at its measured pace.
    estimated_finish: datetime | None = None


class JobList(BaseModel):
    data: list[JobPublic]
    has_more: bool


class AttemptPublic(_TimesInUtc):
    attempt: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    resumed_from_step: int
    # None while the run goes on; then succeeded, cancelled, shutdown, worker_lost or an
    # error type (nan_loss, out_of_memory, timeout, ...).
    reason: str | None
    # Whether the run counts against max_attempts (a shutdown hand-back does not).
    counted: bool


class AttemptList(BaseModel):
    data: list[AttemptPublic]
    has_more: bool


class MetricPublic(_TimesInUtc):
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    samples_per_sec: float
    micro_batch_size: int
    time: datetime
    # Kept with the step's other extra numbers; only on the steps that evaluated.
    eval_loss: float | None = Field(None, validation_alias=AliasPath("extra", "eval_loss"))
    eval_accuracy: float | None = Field(None, validation_alias=AliasPath("extra", "eval_accuracy"))


class MetricList(BaseModel):
    data: list[MetricPublic]
    has_more: bool


class EventPublic(_TimesInUtc):
    id: int
    type: str
    created_at: datetime
    data: dict[str, Any]


class EventList(BaseModel):
    data: list[EventPublic]
    has_more: bool
