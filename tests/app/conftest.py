from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API against a real database and Redis; no worker consumes its queue.

    The reaper is off: its first pass would send the queued jobs other tests left in the
    shared database to this queue (tests/app/jobs/test_reaper.py covers it).
    """
    quiet = settings.model_copy(update={"reaper_interval_seconds": 0})
    with TestClient(create_app(quiet)) as test_client:
        yield test_client
