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
from pydantic import BaseModel, ConfigDict
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


class FieldError(BaseModel):
    path: str
    message: str


class ErrorDetail(BaseModel):
    # Errors add details of their own (job_id, status, limit_bytes, ...).
    model_config = ConfigDict(extra="allow")
    type: str
    message: str
    fields: list[FieldError] | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route's error statuses, each with the envelope's schema."""
    return {
        status: {"model": ErrorResponse, "description": text}
        for status, text in descriptions.items()
    }


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


def error_response(error: AppError) -> JSONResponse:
    return envelope(
        error.status_code, error.type, error.message, headers=error.headers, **error.details
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
        if item.get("type") == "json_invalid":  # its loc is a character offset, not a field
            offset = location[0] if location else "?"
            location = []
            message = f"not valid JSON: {context.get('error', message)} (at character {offset})"
        fields.append(
            {"path": ".".join(location), "message": message.removeprefix("Value error, ")}
        )
    return fields


def _unparseable(cause: BaseException) -> str:
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(cause, ValueError):  # int() refuses more than 4300 digits
        return "a number too long"
    return type(cause).__name__


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, error: AppError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        fields = field_errors(list(error.errors()))
        summary = "; ".join(f"{f['path'] or 'body'}: {f['message']}" for f in fields[:5])
        return envelope(422, "validation_error", summary or "invalid request", fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and error.__cause__ is not None:
            # FastAPI's answer when the JSON parser itself fails rather than finding a syntax
            # error (that is its 422 json_invalid): a body that is not UTF-8, nested deeper
            # than Python's recursion limit, or a number too long to convert. One answer,
            # 422, for every body that is not JSON.
            reason = f"not valid JSON: {_unparseable(error.__cause__)}"
            return envelope(
                422, "validation_error", f"body: {reason}", fields=[{"path": "", "message": reason}]
            )
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return envelope(
            error.status_code, kinds.get(error.status_code, "http_error"), str(error.detail)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return envelope(500, "internal_error", "an internal error occurred; it has been logged")
