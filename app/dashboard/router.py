"""The dashboard: its JSON (`GET /v1/dashboard`) and its page (`GET /dashboard`).

The page is static files (HTML, CSS, three ES modules), no build step. They hold no
data, so they are served without an API key (a browser's navigation cannot send one);
everything the page shows it reads from the API, which checks the key. A strict
Content-Security-Policy keeps the page to its own origin and files: no inline script or
style, nothing from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.auth.deps import PrincipalDep
from app.dashboard import service as dashboard_service
from app.dashboard.schemas import Dashboard
from app.deps import RedisDep, SessionDep, SettingsDep
from app.errors import NotFound, ServiceUnavailable
from app.jobs.scheduling import Policy

router = APIRouter(tags=["dashboard"])

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",  # imports the two modules below
    "api.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # the cancel button must not be clickable through a frame
    # Revalidate each load (the ETag makes that cheap): an upgrade shows at once.
    "Cache-Control": "no-cache",
}
ERRORS: dict[int | str, dict[str, Any]] = {503: {"description": "Redis does not answer"}}


@router.get("/v1/dashboard", response_model=Dashboard, responses=ERRORS)
def read_dashboard(
    session: SessionDep, redis_client: RedisDep, settings: SettingsDep, principal: PrincipalDep
) -> Dashboard:
    """Jobs by status, queue depth, running jobs, the head of the queue in claim order,
    paused jobs, tenants' usage, live workers and the last hour's outcomes."""
    try:
        return dashboard_service.read_dashboard(
            session,
            redis_client,
            queue=settings.queue,
            tenant=principal.scope,
            policy=Policy.of(settings),
        )
    except redis.RedisError as error:
        raise ServiceUnavailable(f"redis does not answer: {type(error).__name__}") from error


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard", include_in_schema=False)
def dashboard_page() -> FileResponse:
    return FileResponse(
        STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS
    )


@router.get("/static/dashboard/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> FileResponse:
    # A fixed list, not a directory: no path from the URL ever reaches the filesystem.
    if name not in ASSETS:
        raise NotFound(f"no such file: {name}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)
