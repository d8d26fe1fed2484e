"""Domain errors and the one handler that renders the error envelope.

Every 4xx/5xx body is {"error": {"type", "message", ...}}. Services raise AppError
subclasses, never HTTPException.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class AppError(Exception):
    status_code = 400
    type = "bad_request"
    # Response headers the error calls for (WWW-Authenticate, Retry-After, ...).
    headers: dict[str, str] = {}  # noqa: RUF012 (read-only per class)

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(AppError):
    status_code = 404
    type = "not_found"


class Conflict(AppError):
    status_code = 409
    type = "conflict"


class InvalidRequest(AppError):
    status_code = 422
    type = "validation_error"


class ServiceUnavailable(AppError):
    status_code = 503
    type = "unavailable"


def envelope(
    status_code: int,
    type: str,
    message: str,
    headers: dict[str, str] | None = None,
    **details: Any,
) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"type": type, "message": message, **details}},
        headers=headers,
    )


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each bad field with its dotted path; errors our validators raise carry the field."""
    fields = []
    for item in errors:
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        message = str(item.get("msg", "invalid"))
        context = item.get("ctx") or {}
        if "field" in context:
            location, message = [str(context["field"])], str(context["message"])
        fields.append(
            {"path": ".".join(location), "message": message.removeprefix("Value error, ")}
        )
    return fields


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, error: AppError) -> JSONResponse:
        return envelope(
            error.status_code, error.type, error.message, headers=error.headers, **error.details
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        fields = field_errors(list(error.errors()))
        summary = "; ".join(f"{f['path'] or 'body'}: {f['message']}" for f in fields[:5])
        return envelope(422, "validation_error", summary or "invalid request", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return envelope(
            error.status_code, kinds.get(error.status_code, "http_error"), str(error.detail)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return envelope(500, "internal_error", "an internal error occurred; it has been logged")
