"""The webhook route tests' fixtures: keys of tenants acme and bravo (a database of its
own), and an API whose dispatcher polls often, retries within a second and may call
127.0.0.1 (the test's receiver)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db import Database
from app.main import create_app
from tests.app.auth.test_auth import Keys, keys, make_settings  # noqa: F401

FAST_WEBHOOKS = {
    "webhook_allowed_networks": ["127.0.0.0/8"],
    "webhook_poll_seconds": 0.05,
    # 5 s, 5 min, 30 min, ... become 2.5 ms, 0.15 s, 0.9 s, ...
    "webhook_retry_scale": 0.0005,
    "webhook_timeout_seconds": 5,
}


@pytest.fixture
def client(
    own_database: Database,
    keys: Keys,  # noqa: F811 (the fixture: created before the app, so auth is on)
    queue_name: str,
    tmp_path: Path,
) -> Iterator[TestClient]:
    settings = make_settings(own_database, queue_name, tmp_path, **FAST_WEBHOOKS)
    with TestClient(create_app(settings)) as test_client:
        yield test_client
