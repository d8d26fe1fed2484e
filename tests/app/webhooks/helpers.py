"""Endpoints and deliveries made through the services, for the tests of this package."""

from __future__ import annotations

from sqlalchemy import select

from app.db import Database
from app.webhooks import service as webhooks_service
from app.webhooks import ssrf
from app.webhooks.models import WebhookDelivery
from app.webhooks.schemas import WebhookCreate

LOOPBACK = ssrf.parse_networks(["127.0.0.0/8"])


def register(
    database: Database, *events: str, tenant: str = "default", url: str = "http://127.0.0.1:9/"
) -> str:
    with database.session() as session:
        create = WebhookCreate.model_validate({"url": url, "events": list(events)})
        created = webhooks_service.create_endpoint(
            session, tenant=tenant, create=create, allowed_networks=LOOPBACK
        )
        session.commit()
        return created.id


def deliveries(database: Database, endpoint_id: str) -> list[WebhookDelivery]:
    with database.session() as session:
        query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
        return list(session.scalars(query.order_by(WebhookDelivery.id)))
