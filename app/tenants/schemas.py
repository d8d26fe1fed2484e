"""What the tenants API takes and returns."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.jobs.spec import MAX_PRIORITY


class TenantUpdate(BaseModel):
    """`PUT /v1/tenants/{name}`: the fields sent are set (null clears a cap or quota);
    those left out keep their values."""

    model_config = ConfigDict(extra="forbid")

    share: float | None = Field(None, gt=0, le=1000, description="fair-share weight (1)")
    max_priority: int | None = Field(None, ge=0, le=MAX_PRIORITY)
    max_running_devices: int | None = Field(None, ge=1, le=1_000_000)
    max_queued_jobs: int | None = Field(None, ge=0, le=1_000_000)
    max_device_hours: float | None = Field(
        None, ge=0, le=1e9, description="device-hours over a rolling 30 days"
    )


class TenantUsage(BaseModel):
    running_devices: int = Field(description="devices of its running jobs now")
    queued_jobs: int
    device_hours_30d: float = Field(description="device-hours of its runs in the last 30 days")
    device_seconds_recent: float = Field(
        description="device-seconds in the fair-share window (TRAINJOB_FAIR_SHARE_WINDOW_SECONDS)"
    )


class TenantPublic(BaseModel):
    name: str
    share: float
    max_priority: int | None
    max_running_devices: int | None
    max_queued_jobs: int | None
    max_device_hours: float | None
    usage: TenantUsage


class TenantList(BaseModel):
    data: list[TenantPublic]
    has_more: bool
