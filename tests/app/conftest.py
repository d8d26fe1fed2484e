from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API against a real database and Redis; no worker consumes its queue."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
