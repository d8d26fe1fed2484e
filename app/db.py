"""Database engine, sessions and the migration check shared by server and worker."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, MetaData, Select, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, SessionTransaction, sessionmaker
from sqlalchemy.pool import QueuePool

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Stable constraint names, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


_AFTER_COMMIT = "trainjob_after_commit"


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run `action` once the session's transaction commits, never if it does not: for what
    a rollback cannot undo (files deleted before a commit that then fails would leave a
    row without its bytes)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for action in session.info.pop(_AFTER_COMMIT, ()):
        action()


@event.listens_for(Session, "after_transaction_end")
def _forget_after_rollback(session: Session, transaction: SessionTransaction) -> None:
    # The outer transaction ended without a commit (rollback, close); a commit popped them.
    if transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)


def read_by_seq(
    session: Session, data: Mapped[bytes], seq: Mapped[int], *where: ColumnElement[bool]
) -> Iterator[bytes]:
    """A blob stored as chunk rows numbered 0, 1, ...: one row per query, so that a large
    one never sits whole in memory."""
    number = 0
    while (chunk := session.scalar(select(data).where(*where, seq == number))) is not None:
        yield chunk
        number += 1


def page(session: Session, query: Select[T], limit: int) -> tuple[list[T], bool]:
    """One page of an ordered query, and whether more rows follow it (one extra row read)."""
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def max_connections(engine: Engine) -> int:
    """How many connections the engine's pool hands out at most at once."""
    pool = engine.pool
    if isinstance(pool, QueuePool):
        return pool.size() + max(pool._max_overflow, 0)
    return 1_000_000  # a pool without a bound (SQLite's NullPool, a StaticPool)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; the busy timeout waits out the
    # short write locks instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """One engine and its session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.sessions()

    def read_piecewise(self, read: Callable[[Session], Iterable[T]]) -> Iterator[T]:
        """The items of `read(session)`, each read in a transaction of its own: for a
        response that streams them, no connection is held between two items, however
        long its client takes to take the last one."""
        with self.session() as session:
            for item in read(session):
                session.rollback()  # ends the read's transaction: the connection goes back
                yield item

    def dispose(self) -> None:
        self.engine.dispose()


class DatabaseNotMigrated(RuntimeError):
    pass


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_migrated(database: Database) -> None:
    """Refuse to run against a database whose schema is not at the code's head revision."""
    current, head = current_revision(database.engine), head_revision()
    if current != head:
        raise DatabaseNotMigrated(
            f"the database is at migration {current or 'none (empty)'}, this code needs {head}; "
            "run `trainjob db upgrade` first"
        )


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
