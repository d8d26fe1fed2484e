"""What `GET /v1/dashboard` returns: the state of the service at a glance."""

from __future__ import annotations

from datetime import datetime

from pydantic import AliasPath, BaseModel, ConfigDict, Field

# Times as the jobs API writes them (UTC, `+00:00`), also for SQLite's naive datetimes.
from app.jobs.schemas import JobProgress, JobRow, JobStatus
from app.jobs.schemas import _TimesInUtc as TimesInUtc
from app.tenants.schemas import TenantUsage


class RunningJob(JobRow):
    """A running (or cancelling) job, with the numbers the jobs table shows."""

    # Read from a job row: `loss` and `samples_per_sec` from its latest metrics, if any
    # (None before the first step), yet always in the answer.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    id: str
    name: str | None
    status: JobStatus
    priority: int
    progress: JobProgress
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    loss: float | None = Field(
        None,
        validation_alias=AliasPath("metrics", "loss"),
        description="the latest optimizer step's loss",
    )
    samples_per_sec: float | None = Field(
        None, validation_alias=AliasPath("metrics", "samples_per_sec")
    )
    worker: str | None = Field(description="node name of the worker running it")
    started_at: datetime | None


# Where each worker's main process announces itself (worker/presence.py writes the keys,
# a WorkerPublic record each, with `job_id` left out).
PRESENCE_KEY_PREFIX = "trainjob:worker:"


class WorkerPublic(TimesInUtc):
    """A worker that announced itself within the last few heartbeats."""

    name: str = Field(description="Celery node name, trainjob-PID@HOST (jobs' `worker`)")
    hostname: str
    pid: int
    device: str = Field(description="`cuda` or `cpu`, from the driver, not from PyTorch")
    cuda_visible_devices: str | None = Field(None, description="as set for the worker")
    queues: list[str]
    # Absent from the records of workers older than it: those ran one job at a time.
    concurrency: int = Field(1, ge=1, description="how many jobs it runs at once")
    job_id: str | None = Field(description="the job it runs now, if you may see it")
    started_at: datetime
    last_seen: datetime


class FinishedCounts(BaseModel):
    succeeded: int
    failed: int
    cancelled: int


class QueuedJob(TimesInUtc):
    """A queued job at the head of the queue, in claim order."""

    id: str
    name: str | None
    tenant: str
    priority: int
    devices: int
    queue_position: int = Field(
        description="queued jobs of its device count that would run before it now"
    )
    created_at: datetime


class PausedJob(JobRow):
    """A job paused (or pausing): it holds its checkpoint, and no device once paused."""

    id: str
    name: str | None
    status: JobStatus
    priority: int
    progress: JobProgress
    created_at: datetime


class TenantUsageRow(TenantUsage):
    """A tenant's usage now: running devices, queued jobs, recent device-seconds."""

    name: str


class Dashboard(TimesInUtc):
    counts: dict[JobStatus, int] = Field(description="jobs by status, every status present")
    queue_depth: int = Field(description="training messages waiting in the broker's queue")
    running: list[RunningJob] = Field(description="running and cancelling jobs, newest first")
    queue: list[QueuedJob] = Field(
        description="the head of the queue in claim order (each device count's own queue)"
    )
    paused: list[PausedJob] = Field(description="paused and pausing jobs, newest first")
    tenants: list[TenantUsageRow] = Field(
        description="per-tenant usage: every active tenant for an admin, else its own"
    )
    workers: list[WorkerPublic]
    finished_last_hour: FinishedCounts
    time: datetime
