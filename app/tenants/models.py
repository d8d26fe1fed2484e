"""A tenant's scheduling settings. A tenant is a name on its API keys; it has a row here
only once an admin sets something for it (`PUT /v1/tenants/{name}`): without one it has a
share of 1, no priority cap and no quota."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow

DEFAULT_SHARE = 1.0


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Fair-share weight: a tenant of share 2 may use twice the device-seconds of one of 1
    # before the other's jobs go first.
    share: Mapped[float] = mapped_column(Float, default=DEFAULT_SHARE, server_default="1")
    # The highest priority its jobs may ask for; None: up to 1000.
    max_priority: Mapped[int | None] = mapped_column(Integer)
    # Quotas; None: unlimited. Devices of its running jobs (more waits), its queued jobs
    # (more is 429 at submit), device-hours over a rolling 30 days (more is 403).
    max_running_devices: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_device_hours: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
