"""One HTTP attempt at a delivery: the payload, its signature, the call and what came back.

The call goes to the address the SSRF guard checked (the URL's host replaced by it), with
the URL's name in the Host header and as the TLS server name (SNI, certificate check):
no second resolution that could land elsewhere. Redirects are not followed (a 3xx is a
failure), and no proxy from the environment is used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from app.webhooks import signing, ssrf

RESPONSE_EXCERPT_BYTES = 1024
ERROR_CHARS = 500


@dataclass(frozen=True)
class Message:
    """What a delivery sends, as its row holds it."""

    webhook_id: str
    url: str
    secret: str
    type: str
    job_id: str
    job_status: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Outcome:
    started_at: datetime
    duration_ms: int
    status_code: int | None
    response_excerpt: str | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def payload(message: Message) -> bytes:
    """`{"type", "timestamp", "data": {"job_id", "status", ...the event's data}}`."""
    created = message.created_at
    created = created if created.tzinfo else created.replace(tzinfo=UTC)  # SQLite: naive UTC
    body = {
        "type": message.type,
        "timestamp": created.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": {"job_id": message.job_id, "status": message.job_status, **message.data},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def send(
    message: Message, *, timeout: float, allowed_networks: Sequence[ssrf.IPNetwork]
) -> Outcome:
    """One attempt; never raises: a refused URL, a timeout or a broken connection is an
    Outcome with an error."""
    started_at, clock = datetime.now(UTC), time.monotonic()

    def outcome(
        status: int | None = None, excerpt: str | None = None, error: str | None = None
    ) -> Outcome:
        duration_ms = int((time.monotonic() - clock) * 1000)
        return Outcome(started_at, duration_ms, status, excerpt, error and error[:ERROR_CHARS])

    try:
        target = ssrf.resolve(message.url, allowed_networks=allowed_networks)
    except ssrf.UnsafeWebhookUrl as refused:
        return outcome(error=refused.message)
    body = payload(message)
    headers = signing.signed_headers(
        message.secret, webhook_id=message.webhook_id, timestamp=int(time.time()), body=body
    )
    headers |= {
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": "trainjob-webhooks",
    }
    url = httpx.URL(message.url).copy_with(host=str(target.address))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response,
        ):
            excerpt = b""
            for chunk in response.iter_bytes():
                excerpt += chunk
                if len(excerpt) >= RESPONSE_EXCERPT_BYTES:
                    break
            text = excerpt[:RESPONSE_EXCERPT_BYTES].decode("utf-8", errors="replace")
            error = None if response.is_success else f"HTTP {response.status_code}"
            return outcome(response.status_code, text, error)
    except httpx.TimeoutException:
        return outcome(error=f"timed out after {timeout:g} s")
    except httpx.HTTPError as failure:
        return outcome(error=f"{type(failure).__name__}: {failure}")
