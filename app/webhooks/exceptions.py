from __future__ import annotations

from app.errors import NotFound


class WebhookNotFound(NotFound):
    def __init__(self, webhook_id: str) -> None:
        super().__init__(f"no webhook {webhook_id!r}", webhook_id=webhook_id)
