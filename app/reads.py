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

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import ARRAY, Select, String, Table, bindparam, func, make_url, select
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

    async def by_id(self, table: Table, row_id: str) -> Any | None:
        """The row of `table` (keyed by a string `id`) with this id, or None."""
        ...

    async def close(self) -> None: ...


class ThreadedReads:
    """The reads on the synchronous engine, in the thread pool (SQLite)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._by_id: dict[Table, Statement] = {}

    def _all(self, statement: Statement, params: Mapping[str, Any]) -> Sequence[Any]:
        with self.database.engine.connect() as connection:
            return connection.execute(statement, dict(params)).all()

    async def all(self, statement: Statement, params: Mapping[str, Any]) -> Sequence[Any]:
        return await run_in_threadpool(self._all, statement, params)

    async def by_id(self, table: Table, row_id: str) -> Any | None:
        statement = self._by_id.get(table)
        if statement is None:
            statement = self._by_id[table] = select(table).where(table.c.id == bindparam("id"))
        rows = await self.all(statement, {"id": row_id})
        return rows[0] if rows else None

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
        self._by_id: dict[Table, _LookupsById] = {}

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

    async def by_id(self, table: Table, row_id: str) -> Any | None:
        lookups = self._by_id.get(table)
        if lookups is None:
            lookups = self._by_id[table] = _LookupsById(self, table)
        return await lookups.row(row_id)

    async def close(self) -> None:
        await self.pool.close()


class _LookupsById:
    """Lookups of one table by id, sent together: while one query is out, the lookups
    that arrive wait for it to come back and then go as the next, one
    `WHERE id = ANY(ids)`. Alone, a lookup is sent at once; under load, one round trip
    answers the many polls that arrived during the previous one (bench/api.py: the job
    GET from 64 clients). Each lookup is answered by a query sent after it arrived, so a
    write committed before a read was asked is always seen."""

    def __init__(self, reads: PostgresReads, table: Table) -> None:
        self.reads = reads
        self.statement = select(table).where(
            table.c.id == func.any(bindparam("ids", type_=ARRAY(String)))
        )
        self.waiting: dict[str, list[asyncio.Future[Any]]] = {}
        self.sender: asyncio.Task[None] | None = None

    async def row(self, row_id: str) -> Any | None:
        answer = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(row_id, []).append(answer)
        if self.sender is None:
            self.sender = asyncio.create_task(self._send())
        return await answer

    async def _send(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, {}
                try:
                    rows = await self.reads.all(self.statement, {"ids": list(batch)})
                except Exception as error:
                    for answers in batch.values():
                        _answer(answers, exception=error)
                    continue
                found = {row.id: row for row in rows}
                for row_id, answers in batch.items():
                    _answer(answers, result=found.get(row_id))
        finally:
            self.sender = None


def _answer(
    answers: list[asyncio.Future[Any]], *, result: Any = None, exception: Exception | None = None
) -> None:
    for answer in answers:
        if answer.done():  # its request went away (the client hung up)
            continue
        if exception is not None:
            answer.set_exception(exception)
        else:
            answer.set_result(result)


async def open_reads(database: Database) -> Reads:
    if database.engine.dialect.name != "postgresql":
        return ThreadedReads(database)
    reads = PostgresReads(database.url)
    await reads.open()
    return reads
