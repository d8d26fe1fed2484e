"""A webhook receiver for the tests: a threaded HTTP server on 127.0.0.1 that verifies
every delivery's signature with the `standardwebhooks` package and records it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

# A receiver's URL may hold a token: the service must never log it.
RECEIVER_PATH = "hooks/receiver-token-7f3a"


@dataclass(frozen=True)
class Received:
    webhook_id: str
    body: dict[str, Any]
    answered: int  # the status code the receiver answered with


@dataclass
class Receiver:
    url: str
    secret: str | None = None  # set once the endpoint is registered
    fail_first: int = 0  # answer 500 to this many requests first
    failing: bool = False  # answer 500 to every request while set
    received: list[Received] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], raw: bytes) -> int:
        assert self.secret is not None
        try:
            body = Webhook(self.secret).verify(raw, headers)
        except Exception as error:  # the test fails on any: recorded, then asserted empty
            self.unverified.append(f"{type(error).__name__}: {error}")
            return 400
        with self.lock:
            status = 500 if self.failing or len(self.received) < self.fail_first else 204
            self.received.append(Received(headers["webhook-id"], body, status))
        return status

    def delivered(self) -> list[Received]:
        """The deliveries answered with success, in the order they came."""
        with self.lock:
            return [r for r in self.received if r.answered < 300]


@contextmanager
def receiving(**options: Any) -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    receiver = Receiver(
        url=f"http://127.0.0.1:{server.server_address[1]}/{RECEIVER_PATH}", **options
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {key.lower(): value for key, value in self.headers.items()}
            status = receiver.answer(headers, raw)
            reply = json.dumps({"ok": status < 300}).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
