"""The hot reads (the job GET, the job list, the API key lookup) without a thread hop.

Every other database call goes through the synchronous engine in app/db.py, in the
thread pool. For the reads that users and dashboards poll, that hop and the ORM around
one primary-key lookup cost most of the request (bench/api.py: the job GET served 11 %
of a bare endpoint's throughput). On PostgreSQL these reads run on psycopg's async
driver in the event loop instead, on a small pool of their own, in autocommit (no BEGIN
and ROLLBACK round trips), returning rows whose columns read as attributes, as ORM
objects' do. On SQLite (the embedded default, one local file) the same queries run on
the synchronous engine in the thread pool.

The queries are SQLAlchemy Core statements with named bind parameters, compiled once
per statement for psycopg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Select, make_url
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from starlette.concurrency import run_in_threadpool

from app.db import Database

# A SELECT of any columns.
Statement = Select[*tuple[Any, ...]]

# Enough for the reads of one API process: they hold a connection for one round trip.
POOL_SIZE = 10
POOL_TIMEOUT_SECONDS = 30.0


class Reads(Protocol):
    async def all(self, statement: Statement, params: Mapping[str, Any]) -> Sequence[Any]:
        """The rows of a SELECT; each row's columns read as attributes."""
        ...

    async def close(self) -> None: ...


class ThreadedReads:
    """The reads on the synchronous engine, in the thread pool (SQLite)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def _all(self, statement: Statement, params: Mapping[str, Any]) -> Sequence[Any]:
        with self.database.engine.connect() as connection:
            return connection.execute(statement, dict(params)).all()

    async def all(self, statement: Statement, params: Mapping[str, Any]) -> Sequence[Any]:
        return await run_in_threadpool(self._all, statement, params)

    async def close(self) -> None:
        pass


class PostgresReads:
    """The reads on psycopg's async driver, in the event loop."""

    def __init__(self, url: str) -> None:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=2,
            max_size=POOL_SIZE,
            timeout=POOL_TIMEOUT_SECONDS,
            kwargs={"autocommit": True, "row_factory": namedtuple_row},
            open=False,
        )
        self._dialect = psycopg_dialect.dialect()
        # Each statement's SQL, and the values it carries itself (a `.limit(1)`'s).
        self._compiled: dict[Statement, tuple[str, dict[str, Any]]] = {}

    async def open(self) -> None:
        await self.pool.open(wait=False)

    def _compile(self, statement: Statement) -> tuple[str, dict[str, Any]]:
        compiled = self._compiled.get(statement)
        if compiled is None:
            sql = statement.compile(dialect=self._dialect)
            compiled = self._compiled[statement] = (str(sql), dict(sql.params))
        return compiled

    async def all(self, statement: Statement, params: Mapping[str, Any]) -> Sequence[Any]:
        sql, own_values = self._compile(statement)
        params = own_values | dict(params)
        # A connection PostgreSQL dropped (a restart) fails its first use: then check
        # the idle ones, replacing those that went with it, and try once more, rather
        # than checking each connection before every use.
        for attempt in range(2):
            try:
                async with self.pool.connection() as connection:
                    cursor = await connection.execute(sql, params)
                    return await cursor.fetchall()
            except psycopg.OperationalError:
                if attempt:
                    raise
                await self.pool.check()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.pool.close()


async def open_reads(database: Database) -> Reads:
    if database.engine.dialect.name != "postgresql":
        return ThreadedReads(database)
    reads = PostgresReads(database.url)
    await reads.open()
    return reads
