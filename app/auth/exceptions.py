"""Errors of authentication; each renders as the error envelope."""

from __future__ import annotations

from app.errors import AppError


class Unauthorized(AppError):
    status_code = 401
    type = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012


class Forbidden(AppError):
    status_code = 403
    type = "forbidden"
