"""Request dependencies as Annotated aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.db import Database
from app.settings import Settings


def _database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def _session(request: Request) -> Iterator[Session]:
    with _database(request).session() as session:
        yield session


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


def _redis(request: Request) -> redis.Redis:
    client: redis.Redis = request.app.state.redis
    return client


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
DatabaseDep = Annotated[Database, Depends(_database)]
CeleryDep = Annotated[Celery, Depends(_celery)]
RedisDep = Annotated[redis.Redis, Depends(_redis)]
