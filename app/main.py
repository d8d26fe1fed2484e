"""The FastAPI application. Never imports torch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from app import health
from app.checkpoints import router as checkpoints_router
from app.db import Database, require_migrated
from app.errors import install_error_handlers
from app.jobs import router as jobs_router
from app.settings import Settings, get_settings
from worker.celery_app import make_celery

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(settings.effective_database_url)
        require_migrated(database)  # refuse to serve an unmigrated schema
        assert settings.redis_url is not None, "TRAINJOB_REDIS_URL is not set"
        app.state.settings = settings
        app.state.database = database
        app.state.celery = make_celery(settings)
        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        try:
            yield
        finally:
            app.state.redis.close()
            database.dispose()

    app = FastAPI(
        title="trainjob",
        version="0.1.0",
        summary="Train neural networks with exact gradient accumulation.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs_router.router)
    app.include_router(checkpoints_router.router)
    return app
