"""Request and response bodies of the webhook routes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.schemas import _TimesInUtc
from app.webhooks.events import WebhookEventType


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[WebhookEventType] = Field(min_length=1, max_length=32)

    @field_validator("events")
    @classmethod
    def _once_each(cls, events: list[str]) -> list[str]:
        return list(dict.fromkeys(events))


class WebhookPublic(_TimesInUtc):
    id: str
    url: str
    events: list[str]
    created_at: datetime


class WebhookCreated(WebhookPublic):
    # The signing secret: in this response only, never again.
    secret: str


class WebhookList(BaseModel):
    data: list[WebhookPublic]
    has_more: bool


class DeliveryAttemptPublic(_TimesInUtc):
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    response_excerpt: str | None
    error: str | None


class DeliveryPublic(_TimesInUtc):
    id: str = Field(description="the webhook-id header: the same at every attempt")
    type: str
    job_id: str
    status: str = Field(description="pending, succeeded or failed (retries ran out)")
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None
    attempts: list[DeliveryAttemptPublic]


class DeliveryList(BaseModel):
    data: list[DeliveryPublic]
    has_more: bool
