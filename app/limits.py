"""Request body cap: a job spec is small, so a large body is refused before it is parsed.

Pure ASGI, so that it sees the bytes as they arrive: a Content-Length over the cap is
refused at once, and a chunked body is cut off as soon as it passes the cap. A path can
have a cap of its own (file uploads: TRAINJOB_MAX_FILE_BYTES).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AppError


class BodyTooLarge(Exception):
    pass


class PayloadTooLarge(AppError):
    """A route's own refusal of a body over its cap: the same answer as the middleware's."""

    status_code = 413
    type = "payload_too_large"
    headers = {"Connection": "close"}  # noqa: RUF012 (the rest of the body is not read)

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} is larger than {limit} bytes", limit_bytes=limit)


@dataclass(frozen=True)
class PathLimit:
    """The cap of one path: `max_bytes` is what a 413 names, `slack_bytes` what the body
    may carry beside it (a multipart body's boundaries and small fields)."""

    max_bytes: int
    slack_bytes: int = 0


async def _refuse(send: Send, limit: int) -> None:
    error = PayloadTooLarge("the request body", limit)
    body = json.dumps(
        {"error": {"type": error.type, "message": error.message, **error.details}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: Mapping[str, PathLimit] | None = None
    ) -> None:
        self.app = app
        self.default = PathLimit(max_bytes)
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.default)
        cutoff, named = limit.max_bytes + limit.slack_bytes, limit.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > cutoff:
                    await _refuse(send, named)
                    return
        received = 0
        started = False
        too_large = False
        replaced = False  # the app's own answer swapped for the 413

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cutoff:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if too_large and not started:
                # The app caught BodyTooLarge (FastAPI turns any failure to read the body
                # into a 400) and answers on its own: the client gets the 413 instead.
                replaced = started = True
                await _refuse(send, named)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, named)
