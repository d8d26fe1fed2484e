"""Tables of webhooks: endpoints, the event types each wants, and the outbox of deliveries
with the attempts made at each."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow
from app.jobs.models import AutoIncrementId


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    # "wh_" + 12 hex digits of milliseconds + 12 random: newest-first pages by primary key.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    # "whsec_" + base64 of random bytes: shown once, at registration; never logged.
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_webhook_endpoints_tenant_id", "tenant", "id"),)


class WebhookSubscription(Base):
    """One row per (endpoint, event type) it wants, keyed by tenant and type first: the
    outbox's INSERT … SELECT finds an event's endpoints with one index lookup."""

    __tablename__ = "webhook_subscriptions"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_webhook_subscriptions_endpoint_id", "endpoint_id"),)


class WebhookDelivery(Base):
    """An outbox row, written in the transaction of the job event it announces."""

    __tablename__ = "webhook_deliveries"

    # Also the order of a job's deliveries to one endpoint: the order of its events.
    id: Mapped[int] = mapped_column(AutoIncrementId, primary_key=True, autoincrement=True)
    # The `webhook-id` header: fixed at creation, the same on every retry (receivers
    # dedupe on it).
    webhook_id: Mapped[str] = mapped_column(String(128), unique=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    # The job's status as the event's transaction left it, and the event's data: the
    # payload is built from them, the same bytes at every attempt.
    job_status: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # succeeded, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # A dispatcher's claim: others skip the row until it expires (its process died).
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claim_token: Mapped[str | None] = mapped_column(String(32))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The dispatcher's poll: pending rows by due time.
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        # Its in-order check (an earlier pending row of the same endpoint and job), and
        # an endpoint's deliveries list.
        Index("ix_webhook_deliveries_endpoint_id_job_id_id", "endpoint_id", "job_id", "id"),
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_job_id", "job_id"),
    )


class WebhookAttempt(Base):
    """One try at sending a delivery, and what came back."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[int] = mapped_column(
        AutoIncrementId,
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    # The start of the response body, bounded (RESPONSE_EXCERPT_BYTES).
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
