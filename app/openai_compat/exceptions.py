"""Errors of the OpenAI-compatible surface; each renders as the error envelope."""

from __future__ import annotations

from app.errors import InvalidRequest, NotFound


class Unsupported(InvalidRequest):
    """A field or value of the OpenAI API that trainjob does not do: refused, naming the
    field, never silently ignored."""

    type = "unsupported"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(
            f"{param}: {message}", param=param, fields=[{"path": param, "message": message}]
        )


class ModelNotFound(NotFound):
    type = "model_not_found"

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"no fine-tuned model {name[:200]!r}: {why}", model=name[:200])
