"""HTTP routes of webhooks: a tenant registers endpoints for its jobs' events and reads
what was delivered to them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.auth.deps import PrincipalDep
from app.deps import Limit, SessionDep, SettingsDep
from app.errors import error_responses
from app.webhooks import service, ssrf
from app.webhooks.schemas import (
    DeliveryList,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookPublic,
)

router = APIRouter(
    prefix="/v1/webhooks",
    tags=["webhooks"],
    responses=error_responses({401: "an API key is needed, or it is unknown or revoked"}),
)
ERRORS = error_responses({404: "no such webhook", 422: "invalid request"})

WebhookId = Annotated[str, Path(min_length=1, max_length=40)]
Cursor = Annotated[
    str | None, Query(max_length=128, description="the last id of the previous page")
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    responses=error_responses({422: "invalid request, or a URL the SSRF guard refuses"}),
)
def create_webhook(
    create: WebhookCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> WebhookCreated:
    """Register an endpoint for the caller's tenant's job events. The answer shows its
    signing secret (`whsec_...`): once, never again."""
    networks = ssrf.parse_networks(settings.webhook_allowed_networks)
    created = service.create_endpoint(
        session, tenant=principal.tenant, create=create, allowed_networks=networks
    )
    session.commit()
    return created


@router.get("", response_model=WebhookList)
def list_webhooks(
    session: SessionDep, principal: PrincipalDep, limit: Limit = 20, after: Cursor = None
) -> WebhookList:
    """The tenant's endpoints, newest first (an admin's: every tenant's)."""
    rows, has_more = service.endpoints_page(
        session, tenant=principal.scope, limit=limit, after=after
    )
    return WebhookList(data=[WebhookPublic.model_validate(row) for row in rows], has_more=has_more)


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=ERRORS)
def get_webhook(
    webhook_id: WebhookId, session: SessionDep, principal: PrincipalDep
) -> WebhookPublic:
    endpoint = service.get_endpoint(session, endpoint_id=webhook_id, tenant=principal.scope)
    return WebhookPublic.model_validate(endpoint)


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=ERRORS,
)
def delete_webhook(webhook_id: WebhookId, session: SessionDep, principal: PrincipalDep) -> Response:
    """Delete the endpoint; its pending deliveries are not sent."""
    service.delete_endpoint(session, endpoint_id=webhook_id, tenant=principal.scope)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList, responses=ERRORS)
def list_deliveries(
    webhook_id: WebhookId,
    session: SessionDep,
    principal: PrincipalDep,
    limit: Limit = 20,
    after: Cursor = None,
) -> DeliveryList:
    """The endpoint's deliveries, newest first, each with its attempts: the status code,
    the start of the response body, the error, the time."""
    data, has_more = service.deliveries_page(
        session, endpoint_id=webhook_id, tenant=principal.scope, limit=limit, after=after
    )
    return DeliveryList(data=data, has_more=has_more)
