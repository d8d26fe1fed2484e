"""Request body cap: a job spec is small, so a large body is refused before it is parsed.

Pure ASGI, so that it sees the bytes as they arrive: a Content-Length over the cap is
refused at once, and a chunked body is cut off as soon as it passes the cap.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "type": "payload_too_large",
                "message": f"the request body is larger than {limit} bytes",
                "limit_bytes": limit,
            }
        }
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
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await _refuse(send, self.max_bytes)
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
                if received > self.max_bytes:
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
                await _refuse(send, self.max_bytes)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, self.max_bytes)
