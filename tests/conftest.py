"""Shared fixtures: real PostgreSQL and Redis on this machine, and a SQLite file.

Each test session gets its own Postgres database and its own Celery queue name, so
runs never see each other's rows or messages.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from app.db import Database, upgrade
from app.settings import Settings
from tests.processes import api_and_worker
from tests.processes import wait_for as wait_for  # where the tests have always found it

POSTGRES_ADMIN = os.environ.get(
    "TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="session")
def make_postgres_database() -> Iterator[Callable[[], str]]:
    """Creates empty databases on demand; drops them all at the end of the session."""
    created: list[str] = []

    def create() -> str:
        name = f"trainjob_test_{secrets.token_hex(6)}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _sqlalchemy_url(POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + name)

    yield create
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        for name in created:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(make_postgres_database: Callable[[], str]) -> str:
    """One migrated Postgres database for the session."""
    url = make_postgres_database()
    upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of each kind the service runs on."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'trainjob.db'}"
        upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture
def own_postgres_url(make_postgres_database: Callable[[], str]) -> str:
    """A migrated Postgres database of this test's own. For a test that runs a worker
    (or run_job): it claims the best queued job of its database (app/jobs/scheduling.py),
    which on the session's shared one may be another test's leftover."""
    url = make_postgres_database()
    upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def own_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Like `database`, but the Postgres one is this test's own (`own_postgres_url`)."""
    if request.param == "postgres":
        url = request.getfixturevalue("own_postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'trainjob.db'}"
        upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def queue_name() -> str:
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def settings(database: Database, queue_name: str, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=database.url,
        redis_url=REDIS_URL,
        queue=queue_name,
        files_queue=f"{queue_name}-files",
        # The session's PostgreSQL database is shared: queued jobs of the default tenant
        # pile up across tests, and the default cap (100) would refuse a later test's
        # submit. tests/app/jobs/test_submit_cap.py tests the cap on a database of its own.
        max_active_jobs_per_tenant=1_000_000,
    )


StartService = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture(scope="session")
def start_service(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> StartService:
    """`with start_service(name, **settings) as client:` an API and a worker (real
    processes) on a new Postgres database and a queue of their own — the API's reaper
    would otherwise send queued jobs other tests leave behind to this worker. Settings
    are TRAINJOB_* values; `worker_env` adds to the worker's environment."""

    @contextmanager
    def start(
        name: str, *, worker_env: dict[str, str] | None = None, **settings: str
    ) -> Iterator[httpx.Client]:
        database_url = make_postgres_database()
        upgrade(database_url)
        logs = tmp_path_factory.mktemp(name)
        with api_and_worker(
            logs,
            worker_env=worker_env,
            database_url=database_url,
            redis_url=REDIS_URL,
            queue=f"{queue_name}-{name}",
            home=str(logs / "home"),
            **settings,
        ) as client:
            yield client

    return start
