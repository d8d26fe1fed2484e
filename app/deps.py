"""Request dependencies as Annotated aliases.

They are `async def`: FastAPI runs a plain `def` dependency in the thread pool, and
those hops cost the job GET and the list 7 % of their throughput (bench/api.py). Only
giving a session's connection back, which is I/O, still goes to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import Database
from app.settings import Settings


async def _database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


async def _session(request: Request) -> AsyncIterator[Session]:
    # Opening a session is free: it connects at its first query, in the route's thread.
    database: Database = request.app.state.database
    session = database.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():  # it holds a connection: the rollback is I/O
            await run_in_threadpool(session.close)
        else:
            session.close()


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


async def _redis(request: Request) -> redis.Redis:
    client: redis.Redis = request.app.state.redis
    return client


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
DatabaseDep = Annotated[Database, Depends(_database)]
CeleryDep = Annotated[Celery, Depends(_celery)]
RedisDep = Annotated[redis.Redis, Depends(_redis)]
