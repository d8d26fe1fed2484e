"""The FastAPI application. Never imports torch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from celery import Celery
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import health
from app.auth.deps import AuthGate
from app.checkpoints import router as checkpoints_router
from app.dashboard import router as dashboard_router
from app.db import Database, require_migrated
from app.deps import session_slots
from app.errors import install_error_handlers
from app.files import router as files_router
from app.files.multipart import MAX_FORM_OVERHEAD_BYTES
from app.jobs import devices
from app.jobs import router as jobs_router
from app.jobs.reaper import Preemption, Reaper
from app.jobs.scheduling import Policy
from app.limits import BodySizeLimit, PathLimit
from app.live.channels import ring
from app.live.hub import LiveHub
from app.observability.metrics import HttpMetricsMiddleware, Metrics, metrics_router
from app.openai_compat import router as openai_router
from app.queue import enqueue_validation, training_queue, training_sender
from app.reads import open_reads
from app.settings import Settings, get_settings
from app.tenants import router as tenants_router
from app.webhooks import router as webhooks_router
from app.webhooks import ssrf
from app.webhooks.dispatcher import Dispatcher
from worker.celery_app import make_celery

logger = logging.getLogger(__name__)


def make_reaper(
    settings: Settings, database: Database, celery: Celery, client: redis.Redis
) -> Reaper:
    return Reaper(
        database,
        lease_timeout=settings.lease_timeout_seconds,
        requeue_after=settings.requeue_after_seconds,
        interval=settings.reaper_interval_seconds,
        send=training_sender(celery, settings.queue),
        # Redis keeps a queue as a list: its length is how many messages wait in it.
        waiting=lambda devices: client.llen(training_queue(settings.queue, devices)),
        validations_waiting=lambda: client.llen(settings.files_queue),
        send_validation=lambda file_id: enqueue_validation(
            celery, file_id=file_id, queue=settings.files_queue
        ),
        ring=lambda job_ids: ring(client, job_ids),
        idempotency_ttl_hours=settings.idempotency_ttl_hours,
        preemption=Preemption(
            capacity=lambda session: devices.live_capacity(session, client, queue=settings.queue),
            gap=settings.preempt_gap,
            min_run_seconds=settings.min_run_seconds,
            policy=Policy.of(settings),
        ),
    )


def make_dispatcher(settings: Settings, database: Database) -> Dispatcher:
    return Dispatcher(
        database,
        timeout=settings.webhook_timeout_seconds,
        retry_scale=settings.webhook_retry_scale,
        interval=settings.webhook_poll_seconds,
        allowed_networks=ssrf.parse_networks(settings.webhook_allowed_networks),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(settings.effective_database_url)
        require_migrated(database)  # refuse to serve an unmigrated schema
        assert settings.redis_url is not None, "TRAINJOB_REDIS_URL is not set"
        app.state.settings = settings
        app.state.database = database
        app.state.session_slots = session_slots(database)
        app.state.reads = await open_reads(database)
        app.state.auth_gate = AuthGate(database, settings.auth)
        if not app.state.auth_gate.required():
            logger.warning(
                "authentication is OFF (%s): anyone who can reach this service is an admin "
                "of every job. Create a key with `trainjob keys create --tenant NAME --admin` "
                "(or set TRAINJOB_AUTH=required).",
                "TRAINJOB_AUTH=off" if settings.auth == "off" else "no API key exists",
            )
        app.state.celery = make_celery(settings)
        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        reaper = make_reaper(settings, database, app.state.celery, app.state.redis)
        # The submit route wakes it: a job of high priority need not wait an interval.
        app.state.reaper = reaper if settings.reaper_interval_seconds > 0 else None
        if app.state.reaper is not None:
            reaper.start()
        app.state.hub = LiveHub(database, settings.redis_url)
        app.state.hub.start()
        dispatcher = make_dispatcher(settings, database)
        if settings.webhook_poll_seconds > 0:
            dispatcher.start()
        try:
            yield
        finally:
            dispatcher.stop()
            await app.state.hub.stop()
            reaper.stop()
            await app.state.reads.close()
            app.state.redis.close()
            database.dispose()

    app = FastAPI(
        title="trainjob",
        version="0.1.0",
        summary="Train neural networks with exact gradient accumulation.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.state.metrics = Metrics(app.state, queue=settings.queue)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_origins:  # no CORS unless asked for: the API is not for other sites
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        )
    # Outermost: a large body is refused before anything reads it. Uploads have their own
    # cap, with room for the multipart boundaries and fields around the file.
    upload_limit = PathLimit(settings.max_file_bytes, slack_bytes=2 * MAX_FORM_OVERHEAD_BYTES)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        per_path={files_router.PATH: upload_limit},
    )
    app.include_router(health.router)
    app.include_router(jobs_router.router)
    app.include_router(checkpoints_router.router)
    app.include_router(files_router.router)
    app.include_router(openai_router.router)
    app.include_router(openai_router.models_router)
    app.include_router(metrics_router)
    app.include_router(tenants_router.router)
    app.include_router(webhooks_router.router)
    app.include_router(dashboard_router.router)  # also `/` → `/dashboard`
    return app
