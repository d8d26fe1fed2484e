"""Migrations on a real Postgres, and the refusal to run on an unmigrated schema."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db import (
    Base,
    Database,
    DatabaseNotMigrated,
    current_revision,
    downgrade,
    head_revision,
    require_migrated,
    upgrade,
)
from app.main import create_app
from app.settings import Settings

TABLES = {
    "jobs",
    "tenants",
    "job_attempts",
    "job_events",
    "job_slots",
    "job_metrics",
    "checkpoints",
    "checkpoint_chunks",
    "api_keys",
    "idempotency_keys",
    "files",
    "file_chunks",
    "job_files",
    "webhook_endpoints",
    "webhook_subscriptions",
    "webhook_deliveries",
    "webhook_attempts",
}


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_empty_to_head_and_downgrade_to_base_on_postgres(
    make_postgres_database: Callable[[], str],
) -> None:
    url = make_postgres_database()
    assert tables(url) == set()
    upgrade(url)
    assert tables(url) == TABLES
    database = Database(url)
    try:
        assert current_revision(database.engine) == head_revision()
        require_migrated(database)
    finally:
        database.dispose()
    downgrade(url)
    assert tables(url) == set()


def test_the_migrated_schema_is_the_schema_of_the_models(database: Database) -> None:
    # `database` is migrated to head (Postgres and SQLite): no difference may remain.
    import app.checkpoints.models
    import app.jobs.models
    import app.tenants.models
    import app.webhooks.models  # noqa: F401

    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_an_unmigrated_database_is_refused_with_a_clear_message(
    make_postgres_database: Callable[[], str],
) -> None:
    database = Database(make_postgres_database())
    try:
        with pytest.raises(DatabaseNotMigrated, match="trainjob db upgrade"):
            require_migrated(database)
    finally:
        database.dispose()


def test_the_api_refuses_to_start_on_an_unmigrated_database(
    make_postgres_database: Callable[[], str], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    settings = Settings(
        home=tmp_path, database_url=make_postgres_database(), redis_url="redis://127.0.0.1:6379/0"
    )
    with pytest.raises(DatabaseNotMigrated), TestClient(create_app(settings)):
        pass


def test_worker_and_db_commands_on_an_unmigrated_database(
    make_postgres_database: Callable[[], str], tmp_path: Path
) -> None:
    url = make_postgres_database()
    env = {**os.environ, "TRAINJOB_DATABASE_URL": url, "TRAINJOB_REDIS_URL": "redis://127.0.0.1:6379/0",
           "TRAINJOB_HOME": str(tmp_path)}  # fmt: skip
    command = [sys.executable, "-m", "cli.main"]
    refused = subprocess.run(
        [*command, "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "run `trainjob db upgrade` first" in refused.stderr
    migrated = subprocess.run(
        [*command, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    assert f"database at revision {head_revision()}" in migrated.stdout
    assert tables(url) == TABLES
