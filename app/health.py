"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import text

from app.deps import DatabaseDep
from app.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency does not answer"}})
def readyz(request: Request, database: DatabaseDep) -> dict[str, str]:
    """The database and Redis answer."""
    try:
        with database.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        raise ServiceUnavailable(f"database does not answer: {type(error).__name__}") from error
    try:
        request.app.state.redis.ping()
    except Exception as error:
        raise ServiceUnavailable(f"redis does not answer: {type(error).__name__}") from error
    return {"status": "ready", "database": "ok", "redis": "ok"}
