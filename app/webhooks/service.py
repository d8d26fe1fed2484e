"""Webhook endpoints as the API sees them: register, read, list, delete, and their
deliveries. Services flush; the route commits."""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import page
from app.webhooks import signing, ssrf
from app.webhooks.exceptions import WebhookNotFound
from app.webhooks.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSubscription,
)
from app.webhooks.schemas import (
    DeliveryAttemptPublic,
    DeliveryPublic,
    WebhookCreate,
    WebhookCreated,
)


def new_endpoint_id() -> str:
    return f"wh_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def create_endpoint(
    session: Session,
    *,
    tenant: str,
    create: WebhookCreate,
    allowed_networks: Sequence[ssrf.IPNetwork],
) -> WebhookCreated:
    """Register an endpoint for the tenant's job events; its URL must pass the SSRF guard
    (UnsafeWebhookUrl). The answer carries the signing secret: the only time it is shown."""
    ssrf.resolve(create.url, allowed_networks=allowed_networks)
    endpoint = WebhookEndpoint(
        id=new_endpoint_id(),
        tenant=tenant,
        url=create.url,
        events=list(create.events),
        secret=signing.new_secret(),
    )
    session.add(endpoint)
    session.flush()  # the subscriptions refer to it
    session.add_all(
        WebhookSubscription(tenant=tenant, event_type=event_type, endpoint_id=endpoint.id)
        for event_type in create.events
    )
    session.flush()
    return WebhookCreated.model_validate(endpoint)


def get_endpoint(session: Session, *, endpoint_id: str, tenant: str | None) -> WebhookEndpoint:
    """The endpoint, or WebhookNotFound; with `tenant`, another tenant's is not found either."""
    endpoint = session.get(WebhookEndpoint, endpoint_id) if len(endpoint_id) <= 40 else None
    if endpoint is None or (tenant is not None and endpoint.tenant != tenant):
        raise WebhookNotFound(endpoint_id)
    return endpoint


def endpoints_page(
    session: Session, *, tenant: str | None, limit: int, after: str | None
) -> tuple[list[WebhookEndpoint], bool]:
    """Newest first; `after` is the id of the last endpoint of the previous page."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.id.desc())
    if tenant is not None:
        query = query.where(WebhookEndpoint.tenant == tenant)
    if after is not None:
        query = query.where(WebhookEndpoint.id < after)
    return page(session, query, limit)


def delete_endpoint(session: Session, *, endpoint_id: str, tenant: str | None) -> None:
    """Delete the endpoint, its subscriptions and its deliveries (pending ones are not sent)."""
    session.delete(get_endpoint(session, endpoint_id=endpoint_id, tenant=tenant))
    session.flush()


def deliveries_page(
    session: Session, *, endpoint_id: str, tenant: str | None, limit: int, after: str | None
) -> tuple[list[DeliveryPublic], bool]:
    """The endpoint's deliveries, newest first, each with its attempts; `after` is the
    id (webhook-id) of the last delivery of the previous page."""
    get_endpoint(session, endpoint_id=endpoint_id, tenant=tenant)
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.id.desc())
    )
    if after is not None:
        cursor = select(WebhookDelivery.id).where(
            WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.webhook_id == after
        )
        query = query.where(WebhookDelivery.id < cursor.scalar_subquery())
    deliveries, has_more = page(session, query, limit)
    attempts: dict[int, list[WebhookAttempt]] = defaultdict(list)
    rows = session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_([delivery.id for delivery in deliveries]))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
    )
    for attempt in rows:
        attempts[attempt.delivery_id].append(attempt)
    return [public(delivery, attempts[delivery.id]) for delivery in deliveries], has_more


def public(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryPublic:
    pending = delivery.status == "pending"
    return DeliveryPublic(
        id=delivery.webhook_id,
        type=delivery.type,
        job_id=delivery.job_id,
        status=delivery.status,
        created_at=delivery.created_at,
        next_attempt_at=delivery.next_attempt_at if pending else None,
        finished_at=delivery.finished_at,
        attempts=[DeliveryAttemptPublic.model_validate(attempt) for attempt in attempts],
    )
