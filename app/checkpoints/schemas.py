from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app.jobs.schemas import _TimesInUtc


class CheckpointPublic(_TimesInUtc):
    step: int
    created_at: datetime
    size_bytes: int
    loss: float | None
    # Of the last evaluation at or before this step; null before the first one.
    eval_loss: float | None


class CheckpointList(BaseModel):
    data: list[CheckpointPublic]
    has_more: bool
