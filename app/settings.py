"""The one settings object, read from TRAINJOB_* environment variables.

The server, the worker and the CLI all read configuration here; no other module reads
os.environ for configuration. What each setting does is in README.md's settings table
(tests/test_docs.py checks that every one is there).
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINJOB_", extra="ignore")

    home: Path = Path(".trainjob")
    database_url: str | None = None  # unset: a SQLite file under `home`
    redis_url: str | None = None  # unset: `trainjob serve` starts an embedded Redis
    checkpoint_dir: Path | None = None  # unset: checkpoint bytes in the database
    files_dir: Path | None = None  # unset: uploaded files in the database
    max_file_bytes: int = Field(1024**3, ge=1024)
    hf_model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Checked against a model's config before its weights are loaded or allocated.
    hf_max_parameters: int = Field(200_000_000, ge=1)
    queue: str = "gpu"
    files_queue: str = "files"
    # What a worker owns (worker/devices.py): "0,1,2,3" or "cpu:4"; unset: every visible
    # CUDA device, else one CPU device.
    worker_devices: str | None = None
    # Where the other nodes of a multi-node job reach this worker's rendezvous (slot 0):
    # an address or a name they can resolve. Unset: this host's name.
    worker_address: str = Field(default_factory=socket.getfqdn)
    # How long the worker that claims a multi-node job waits for the others before it
    # hands the job back (app/jobs/gangs.py).
    gang_wait_seconds: float = Field(60.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Redis redelivers an unacknowledged task after this long: keep it above the longest job.
    visibility_timeout_seconds: int = Field(7 * 24 * 3600, ge=60)
    progress_flush_seconds: float = Field(0.5, gt=0)
    log_level: str = "info"
    heartbeat_seconds: float = Field(5.0, gt=0)
    lease_timeout_seconds: float = Field(60.0, gt=0)
    reaper_interval_seconds: float = Field(10.0, ge=0)  # 0 turns the reaper off
    requeue_after_seconds: float = Field(300.0, gt=0)
    shutdown_timeout_seconds: float = Field(60.0, gt=0)
    stream_keepalive_seconds: float = Field(15.0, gt=0)
    auth: Literal["auto", "required", "off"] = "auto"
    max_active_jobs_per_tenant: int = Field(100, ge=1)
    # Scheduling (app/jobs/scheduling.py).
    preempt_gap: int = Field(100, ge=1, le=1000)
    min_run_seconds: float = Field(300.0, ge=0)
    priority_aging_seconds: float = Field(60.0, gt=0)
    fair_share_window_seconds: float = Field(3600.0, gt=0)
    allow_unseen_cuda: bool = False
    idempotency_ttl_hours: float = Field(48.0, ge=24)
    max_body_bytes: int = Field(65536, ge=1024)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Deterministic kernels in every job (worker/engine/determinism.py): CUDA runs that
    # repeat bit for bit, resumed ones included, at some cost in speed.
    deterministic: bool = False
    # The MLflow server jobs with `tracking` log to (worker/tracking/); unset: such jobs
    # are refused at submit. May hold credentials: never logged, nor put in a job's events.
    mlflow_tracking_uri: str | None = None
    test_faults: str | None = None  # testing only: faults a worker injects into every job
    log_format: Literal["text", "json"] = "text"
    # Webhooks (app/webhooks/): CIDRs a webhook may target though not public (private,
    # loopback, ...); how long a receiver has to answer; a factor on the retry schedule
    # (tests shrink the day of retries to seconds); how often the dispatcher looks for
    # due deliveries (0 turns it off in this process).
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300)
    webhook_retry_scale: float = Field(1.0, gt=0)
    webhook_poll_seconds: float = Field(1.0, ge=0)
    url: str = "http://127.0.0.1:8000"  # where the command-line client finds the API
    api_key: SecretStr | None = None  # a secret: never printed or logged

    @field_validator("cors_origins", "hf_model_dirs", "webhook_allowed_networks", mode="before")
    @classmethod
    def _split_list(cls, value: object, info: ValidationInfo) -> object:
        # Origins are separated by commas, directories by colons (as in PATH).
        if isinstance(value, str):
            separator = ":" if info.field_name == "hf_model_dirs" else ","
            return [part.strip() for part in value.split(separator) if part.strip()]
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks_are_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # a ValueError names the bad one
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
