"""Submits a tenant's caps and quotas refuse; each renders as the error envelope."""

from __future__ import annotations

from app.auth.exceptions import Forbidden
from app.errors import AppError


class PriorityNotAllowed(Forbidden):
    type = "priority_not_allowed"

    def __init__(self, priority: int, cap: int, by: str) -> None:
        super().__init__(
            f"priority {priority} is above this {by}'s max_priority {cap}",
            priority=priority,
            max_priority=cap,
        )


class QueuedQuotaExceeded(AppError):
    status_code = 429
    type = "quota_exceeded"
    headers = {"Retry-After": "30"}  # noqa: RUF012

    def __init__(self, tenant: str, queued: int, limit: int) -> None:
        super().__init__(
            f"tenant {tenant!r} has {queued} queued jobs, its max_queued_jobs quota is {limit}; "
            "retry when some have started",
            quota="max_queued_jobs",
            limit=limit,
            queued_jobs=queued,
        )


class DeviceHoursQuotaExceeded(Forbidden):
    type = "quota_exceeded"

    def __init__(self, tenant: str, used: float, limit: float) -> None:
        super().__init__(
            f"tenant {tenant!r} used {used:.2f} device-hours in the last 30 days, its "
            f"max_device_hours quota is {limit:g}",
            quota="max_device_hours",
            limit=limit,
            used_device_hours=round(used, 4),
        )
