"""Request body cap: a job spec is small, so a large body is refused before it is parsed.

Pure ASGI, so that it sees the bytes as they arrive: a Content-Length over the cap is
refused at once, and a chunked body is cut off as soon as it passes the cap. A path can
have a cap of its own (file uploads: TRAINJOB_MAX_FILE_BYTES). Before any early refusal
goes out (this 413, a route's own, a 401 to an upload) the rest of the body is read and
dropped, DISCARD_BYTES in all at most, so that the client hears the answer.

Not FastAPI's `max_body_size=` (0.165, Starlette's RequestBodyLimitMiddleware), read
and tried against the installed versions:
- A body with a Content-Length over the cap is still routed: the route runs (a
  cancel with a 10 MB body would cancel), and whatever goes out, our exception
  handler's envelope included, is swapped at `http.response.start` for a plain-text
  `Content Too Large` without the cap in bytes. Only a chunked body's 413 comes
  through FastAPI's exception handlers, where the envelope could be rendered.
- A cap is one number per app, router or route: the upload route's would be the file
  cap plus the multipart slack, and its 413 could only name that sum.
- Nothing reads the rest of the body before the 413: uvicorn closes on a client still
  sending, and urllib or requests posting 12 MiB gets a connection reset, not the 413.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AppError, error_response

# A body over its cap is read and dropped up to this many bytes in all before the 413
# goes out: clients that send the whole body before they read the answer (urllib,
# requests) then get it, not a broken pipe. Past it the connection is closed at once.
DISCARD_BYTES = 16 * 1024 * 1024


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


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    await error_response(PayloadTooLarge("the request body", limit))(scope, receive, send)


class _Body:
    """The request body as the app reads it, counted against the cap, and what is left
    of it dropped when an answer goes out before it was read."""

    def __init__(self, receive: Receive, cutoff: int, expects_continue: bool) -> None:
        self._receive = receive
        self.cutoff = cutoff
        self.expects_continue = expects_continue
        self.received = 0
        self.asked = False  # the app has read: the server has sent `100 Continue`, if asked for
        self.ended = False
        self.too_large = False

    async def receive(self) -> Message:
        self.asked = True
        message = await self._take()
        if self.received > self.cutoff:
            self.too_large = True
            raise BodyTooLarge
        return message

    async def _take(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.ended = not message.get("more_body", False)
        else:  # the client went away
            self.ended = True
        return message

    async def discard(self) -> None:
        """Read and drop the rest of the body, DISCARD_BYTES in all at most. A client
        that waits for `100 Continue` before it sends has sent nothing: not read either."""
        if self.expects_continue and not self.asked:
            return
        while not self.ended and self.received <= DISCARD_BYTES:
            await self._take()


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
        headers = Headers(scope=scope)
        body = _Body(
            receive, cutoff, expects_continue=headers.get("expect", "").lower() == "100-continue"
        )
        declared = _content_length(headers)
        if declared is not None and declared > cutoff:
            if declared <= DISCARD_BYTES:
                await body.discard()
            await _refuse(scope, receive, send, named)
            return
        # A body may follow: some framing says so (a GET has none, and nothing to drop).
        has_body = bool(declared) or "transfer-encoding" in headers
        started = False
        replaced = False  # the app's own answer swapped for the 413

        async def tracking_send(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if body.too_large and not started:
                # The app caught BodyTooLarge (FastAPI turns any failure to read the body
                # into a 400) and answers on its own: the client gets the 413 instead.
                replaced = started = True
                await body.discard()
                await _refuse(scope, receive, send, named)
                return
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and has_body:
                    # An early refusal (a file over its cap, a bad key on an upload):
                    # read the rest first, or the client is still sending when we close.
                    await body.discard()
            await send(message)

        try:
            await self.app(scope, body.receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await body.discard()
                await _refuse(scope, receive, send, named)


def _content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None
