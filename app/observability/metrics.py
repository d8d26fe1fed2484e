"""Prometheus metrics of one API process, served at GET /metrics.

Read at each scrape: jobs by status (one GROUP BY on the jobs table, answered by its
(status, id) index) and the depth of the training queue in Redis. Recorded as they
happen: the duration of every HTTP request, by route template, and the steps of
running jobs, from the live events the process's hub reads (`Metrics.observe_event`).

Each app has a registry of its own, not prometheus_client's global one, so that a
test can create as many apps as it likes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from typing import Any, TypeGuard, get_args

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.deps import AdminDep
from app.jobs.models import Job
from app.jobs.runs import LIVE_STATUSES
from app.jobs.schemas import JobStatus

logger = logging.getLogger(__name__)

JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
# Any other method a client sends is counted as "other": labels must stay a small set.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Optimizer steps take from milliseconds (a small MLP on CPU) to minutes (big windows).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# A job's samples/s is dropped when none of its steps has come for this long: the hub
# delivers at most once, so a missed final status must not keep the series forever.
STALE_SECONDS = 900.0


class Metrics:
    """The registry of one app, and the series the process records as things happen."""

    def __init__(self, state: State, *, queue: str) -> None:
        self.registry = CollectorRegistry()
        self.step_duration = Histogram(
            "trainjob_step_duration_seconds",
            "Wall time of one optimizer step of a running job (its whole window).",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.http_request_duration = Histogram(
            "trainjob_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._samples_per_second: dict[str, tuple[float, float]] = {}  # job: (rate, when)
        self._lock = threading.Lock()
        self.registry.register(_ReadAtScrape(self, state, queue))

    def observe_event(self, job_id: str, event: dict[str, Any]) -> None:
        """A live event of a job, as the hub's listeners get it: a `metrics` event is one
        optimizer step; a status other than running or cancelling ends the job's rate."""
        data = event.get("data") or {}
        if event.get("type") == "metrics":
            seconds = data.get("step_seconds")  # absent in events of older workers
            if _is_number(seconds) and seconds >= 0:
                self.step_duration.observe(seconds)
            rate = data.get("samples_per_sec")
            if _is_number(rate):
                with self._lock:
                    self._samples_per_second[job_id] = (float(rate), time.monotonic())
        elif event.get("type") == "status" and data.get("status") not in LIVE_STATUSES:
            with self._lock:
                self._samples_per_second.pop(job_id, None)

    def samples_per_second(self) -> dict[str, float]:
        """The latest rate of each running job, forgetting jobs gone quiet."""
        cutoff = time.monotonic() - STALE_SECONDS
        with self._lock:
            for job_id, (_, when) in list(self._samples_per_second.items()):
                if when < cutoff:
                    del self._samples_per_second[job_id]
            return {job_id: rate for job_id, (rate, _) in self._samples_per_second.items()}


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _ReadAtScrape(Collector):
    """The series computed when Prometheus asks: from the database, Redis and memory.

    A dependency that does not answer leaves its series out of that scrape (and says so
    in the log) rather than failing the whole scrape."""

    def __init__(self, metrics: Metrics, state: State, queue: str) -> None:
        self.metrics = metrics
        self.state = state  # the lifespan opens state.database and state.redis
        self.queue = queue

    def collect(self) -> Iterable[Metric]:
        yield from self._jobs()
        yield from self._queue_depth()
        rates = GaugeMetricFamily(
            "trainjob_samples_per_second",
            "Training samples per second of each running job, at its latest step.",
            labels=["job_id"],
        )
        for job_id, rate in sorted(self.metrics.samples_per_second().items()):
            rates.add_metric([job_id], rate)
        yield rates

    def _jobs(self) -> Iterable[Metric]:
        database = getattr(self.state, "database", None)
        if database is None:
            return
        try:
            with database.session() as session:
                rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
                counts = {status: count for status, count in rows}
        except Exception:
            logger.warning("metrics: could not count jobs", exc_info=True)
            return
        family = GaugeMetricFamily("trainjob_jobs", "Jobs by status.", labels=["status"])
        for status in JOB_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family

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
