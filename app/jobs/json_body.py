"""The submit body is read as JSON whatever its Content-Type says.

curl's `-d` sends `application/x-www-form-urlencoded`, and FastAPI hands a body of any
type but JSON to the model as bytes ("body: Input should be a valid dictionary"). This
route class (FastAPI's hook for custom request handling) has such a body parsed as
JSON; when it is not JSON, the 422 says what to send.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from app.errors import InvalidRequest, field_errors

WHAT_TO_SEND = (
    "send the job spec as JSON with `content-type: application/json`; "
    "a YAML spec goes through `trainjob submit SPEC.yaml`"
)


def is_json(content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


class JsonBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_as_json(request: Request) -> Response:
            sent = request.headers.get("content-type")
            if is_json(sent):
                return await handle(request)
            headers = [item for item in request.scope["headers"] if item[0] != b"content-type"]
            as_json = {
                **request.scope,
                "headers": [*headers, (b"content-type", b"application/json")],
            }
            try:
                return await handle(Request(as_json, request.receive))
            except RequestValidationError as error:
                errors = list(error.errors())
                if not any(item.get("type") == "json_invalid" for item in errors):
                    raise
                reason = field_errors(errors)[0]["message"]
                kind = f"`{sent}`" if sent else "no content type"
                raise InvalidRequest(
                    f"body: {reason}, sent with {kind}: {WHAT_TO_SEND}",
                    fields=[{"path": "", "message": f"{reason}: {WHAT_TO_SEND}"}],
                ) from None

        return handle_as_json
