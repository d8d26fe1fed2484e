"""HTTP routes of tenants: an admin sets a tenant's share, priority cap and quotas; a
tenant may read its own settings and usage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.auth.deps import AdminDep, PrincipalDep
from app.deps import Limit, SessionDep, SettingsDep
from app.errors import NotFound, error_responses
from app.tenants import service
from app.tenants.schemas import TenantList, TenantPublic, TenantUpdate

router = APIRouter(
    prefix="/v1/tenants",
    tags=["tenants"],
    responses=error_responses(
        {401: "an API key is needed, or it is unknown or revoked", 422: "invalid request"}
    ),
)

TenantName = Annotated[str, Path(min_length=1, max_length=64)]


@router.put(
    "/{name}",
    response_model=TenantPublic,
    responses=error_responses({403: "this needs an admin key"}),
)
def set_tenant(
    name: TenantName, update: TenantUpdate, session: SessionDep, settings: SettingsDep, _: AdminDep
) -> TenantPublic:
    """Set the tenant's `share` (fair-share weight), `max_priority` and quotas
    (`max_running_devices`, `max_queued_jobs`, `max_device_hours` over 30 days); fields
    left out keep their values, null clears a cap. Admins only."""
    service.set_tenant(session, name=name, update=update)
    session.commit()
    return service.public(
        session, name=name, fair_share_window_seconds=settings.fair_share_window_seconds
    )


@router.get(
    "", response_model=TenantList, responses=error_responses({403: "this needs an admin key"})
)
def list_tenants(
    session: SessionDep,
    settings: SettingsDep,
    _: AdminDep,
    limit: Limit = 20,
    after: Annotated[str | None, Query(max_length=64, description="tenant name cursor")] = None,
) -> TenantList:
    """Every tenant (with settings or jobs) by name, with its usage. Admins only."""
    names, has_more = service.names_page(session, limit=limit, after=after)
    window = settings.fair_share_window_seconds
    data = [service.public(session, name=name, fair_share_window_seconds=window) for name in names]
    return TenantList(data=data, has_more=has_more)


@router.get(
    "/{name}", response_model=TenantPublic, responses=error_responses({404: "no such tenant"})
)
def get_tenant(
    name: TenantName, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> TenantPublic:
    """A tenant's settings and usage: an admin's for any tenant, a key's for its own."""
    if principal.scope is not None and principal.scope != name:
        raise NotFound(f"no tenant {name!r}")
    return service.public(
        session, name=name, fair_share_window_seconds=settings.fair_share_window_seconds
    )
