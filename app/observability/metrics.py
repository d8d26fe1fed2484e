"""Prometheus metrics of one API process, served at GET /metrics.

Read at each scrape: jobs by status (one GROUP BY on the jobs table, answered by its
(status, id) index), the latest samples/s of each running job (its row), the steps
stored since the previous scrape (their `metrics` events), the queue waits of the runs
started since the previous scrape (their attempts' `waited_seconds`) and the depth of the
training queue in Redis. Recorded as they happen: the duration of every HTTP request,
by route template.

Each app has a registry of its own, not prometheus_client's global one, so that a
test can create as many apps as it likes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import get_args

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.deps import AdminDep
from app.jobs.models import Job, JobAttempt, JobEvent
from app.jobs.runs import LIVE_STATUSES
from app.jobs.schemas import JobStatus

logger = logging.getLogger(__name__)

JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
# Any other method a client sends is counted as "other": labels must stay a small set.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Optimizer steps take from milliseconds (a small MLP on CPU) to minutes (big windows).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Queue waits run from a worker that is free at once to hours behind a busy pool.
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    """The registry of one app, and the series the process records as things happen."""

    def __init__(self, state: State, *, queue: str) -> None:
        self.registry = CollectorRegistry()
        # First: it observes the steps stored since the last scrape into step_duration
        # (and the runs started into queue_wait), which the registry then collects (in
        # the order of registration).
        self.registry.register(_ReadAtScrape(self, state, queue))
        self.step_duration = Histogram(
            "trainjob_step_duration_seconds",
            "Wall time of one optimizer step of a running job (its whole window).",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "trainjob_queue_wait_seconds",
            "Time a job waited queued before a run of it started (each run: a job "
            "preempted or resumed waits again).",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.http_request_duration = Histogram(
            "trainjob_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )


class _ReadAtScrape(Collector):
    """The series computed when Prometheus asks: from the database, Redis and memory.

    A dependency that does not answer leaves its series out of that scrape (and says so
    in the log) rather than failing the whole scrape."""

    def __init__(self, metrics: Metrics, state: State, queue: str) -> None:
        self.metrics = metrics
        self.state = state  # the lifespan opens state.database and state.redis
        self.queue = queue
        self.steps_after: int | None = None  # the newest metrics event observed
        self.starts_after: datetime | None = None  # the latest run start observed
        self.reading_steps = threading.Lock()  # two scrapes at once must not count twice

    def collect(self) -> Iterable[Metric]:
        yield from self._jobs()
        yield from self._queue_depth()

    def _jobs(self) -> Iterable[Metric]:
        database = getattr(self.state, "database", None)
        if database is None:
            return
        rate = Job.metrics["samples_per_sec"].as_float()
        try:
            with database.session() as session:
                rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
                counts = {status: count for status, count in rows}
                rates = session.execute(
                    select(Job.id, rate)
                    .where(Job.status.in_(LIVE_STATUSES), rate.is_not(None))
                    .order_by(Job.id)
                ).all()
                self._observe_new_steps(session)
                self._observe_new_waits(session)
        except Exception:
            logger.warning("metrics: could not read the jobs", exc_info=True)
            return
        family = GaugeMetricFamily("trainjob_jobs", "Jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family
        family = GaugeMetricFamily(
            "trainjob_samples_per_second",
            "Training samples per second of each running job, at its latest step.",
            labels=["job_id"],
        )
        for job_id, samples_per_second in rates:
            family.add_metric([job_id], samples_per_second)
        yield family

    def _observe_new_steps(self, session: Session) -> None:
        """The `step_seconds` of the `metrics` events stored since the previous scrape (the
        first scrape starts the count, as a counter does). Ids are taken at insert: an
        event committed after a newer one was observed is missed, a sample lost."""
        seconds = JobEvent.data["step_seconds"].as_float()  # absent from older workers'
        with self.reading_steps:
            if self.steps_after is None:
                self.steps_after = session.scalar(select(func.max(JobEvent.id))) or 0
                return
            rows = session.execute(
                select(JobEvent.id, seconds)
                .where(JobEvent.id > self.steps_after, JobEvent.type == "metrics")
                .order_by(JobEvent.id)
            ).all()
            for _, value in rows:
                if value is not None and value >= 0:
                    self.metrics.step_duration.observe(value)
            if rows:
                self.steps_after = rows[-1].id

    def _observe_new_waits(self, session: Session) -> None:
        """The `waited_seconds` of the runs started since the previous scrape (the first
        scrape starts the count). A run whose start commits after a later one's was
        observed is missed, a sample lost, as for the steps."""
        with self.reading_steps:
            if self.starts_after is None:
                latest = session.scalar(select(func.max(JobAttempt.started_at)))
                self.starts_after = latest or datetime.min.replace(tzinfo=UTC)
                return
            rows = session.execute(
                select(JobAttempt.started_at, JobAttempt.waited_seconds)
                .where(JobAttempt.started_at > self.starts_after)
                .order_by(JobAttempt.started_at)
            ).all()
            for _, waited in rows:
                if waited is not None and waited >= 0:
                    self.metrics.queue_wait.observe(waited)
            if rows:
                self.starts_after = rows[-1].started_at

    def _queue_depth(self) -> Iterable[Metric]:
        client = getattr(self.state, "redis", None)
        if client is None:
            return
        try:
            depth = client.llen(self.queue)
        except Exception:
            logger.warning("metrics: could not read the queue depth", exc_info=True)
            return
        family = GaugeMetricFamily(
            "trainjob_queue_depth",
            "Training messages waiting in the broker's queue (not yet taken by a worker).",
            labels=["queue"],
        )
        family.add_metric([self.queue], depth)
        yield family


class HttpMetricsMiddleware:
    """Times every HTTP request, labelled with the template of the route that answered
    it (`/v1/jobs/{job_id}`, never the raw path, so that the series stay few)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app starts a response: an exception escaped it

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            # The router puts the route it matched into the scope; no route: unmatched.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.http_request_duration.labels(method, route, str(status)).observe(
                time.perf_counter() - started
            )


metrics_router = APIRouter(tags=["monitoring"])


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(request: Request, _: AdminDep) -> Response:
    """Prometheus metrics of this API process. Their labels name every tenant's jobs, so
    with auth on they need an admin key (give the scraper one)."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
