"""HTTP routes of jobs: submit, read, list, cancel, pause, resume, metrics, events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.sse import ServerSentEvent
from pydantic import StringConstraints
from starlette.concurrency import run_in_threadpool

from app.auth.deps import PrincipalDep
from app.deps import (
    MAX_INT32,
    CeleryDep,
    DatabaseDep,
    Limit,
    ReadsDep,
    ReaperDep,
    RedisDep,
    SessionDep,
    SettingsDep,
    StepCursor,
    StepsLimit,
)
from app.errors import error_responses
from app.ids import JOB_ID_PATTERN
from app.jobs import devices, estimates
from app.jobs import service as jobs_service
from app.jobs.json_body import JsonBodyRoute
from app.jobs.models import JobAttempt, JobEvent, JobMetric
from app.jobs.runs import send_jobs
from app.jobs.scheduling import Policy
from app.jobs.schemas import (
    TERMINAL_STATUSES,
    AttemptList,
    EventList,
    JobList,
    JobPublic,
    JobStatus,
    MetricList,
)
from app.jobs.spec import JobSpec
from app.live.channels import ring
from app.live.stream import (
    AcceptsEventStream,
    EventStreamResponse,
    job_event_stream,
    parse_last_event_id,
)
from app.queue import training_sender

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    responses=error_responses({401: "an API key is needed, or it is unknown or revoked"}),
)

MAX_INT64 = 2**63 - 1  # event ids: past it a cursor is a 422, not a database error
ERRORS = error_responses({404: "no such job", 422: "invalid request"})


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x20-\x7e]+$",
        description="printable ASCII, e.g. a UUID: the same key and body from the same "
        "tenant return the same job",
    ),
]


# Registered below, after it: the decorators take no route class, and JsonBodyRoute reads
# the body as JSON whatever its content type.
def submit_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    redis_client: RedisDep,
    principal: PrincipalDep,
    reaper: ReaperDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobPublic:
    """Validate a job spec, store the job as `queued`, and send it to the workers (a job
    whose dataset file is still validating is sent when the file is valid)."""
    submitted = jobs_service.submit_job(
        session,
        spec=spec,
        tenant=principal.tenant,
        max_active_jobs=settings.max_active_jobs_per_tenant,
        cuda_available=lambda: (
            settings.allow_unseen_cuda
            or devices.cuda_worker_seen(redis_client, queue=settings.queue)
        ),
        most_devices=lambda: devices.most_devices(redis_client, queue=settings.queue),
        idempotency_key=idempotency_key,
        idempotency_ttl_hours=settings.idempotency_ttl_hours,
        admin=principal.admin,
        key_max_priority=principal.max_priority,
        tracking_configured=settings.mlflow_tracking_uri is not None,
    )
    session.commit()
    send = training_sender(celery, settings.queue)
    send_jobs(session, submitted.to_send, send=send, devices={submitted.job.id: spec.devices})
    if reaper is not None and submitted.to_send:
        reaper.wake()  # a pass now: the new job may preempt a running one of lower priority
    if submitted.replayed:
        response.status_code = status.HTTP_200_OK
    return JobPublic.model_validate(submitted.job)


router.add_api_route(
    "",
    submit_job,
    methods=["POST"],
    route_class_override=JsonBodyRoute,
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={
        **ERRORS,
        200: {"model": JobPublic, "description": "an earlier submit with this key and body"},
        **error_responses(
            {
                409: "the Idempotency-Key was used with another body",
                413: "the body is larger than TRAINJOB_MAX_BODY_BYTES",
                422: "an invalid spec, a dataset file that is unknown, invalid or does "
                "not fit the model, device `cuda` with no live CUDA worker, or `tracking` with "
                "no TRAINJOB_MLFLOW_TRACKING_URI",
                403: "a priority above the key's or tenant's max_priority, preemptible "
                "false without an admin key, or the tenant's device-hours quota used up",
                429: "the tenant has too many queued and running jobs, or its "
                "max_queued_jobs quota is reached",
            }
        ),
    },
)


@router.get("", response_model=JobList, responses=ERRORS)
async def list_jobs(
    reads: ReadsDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    limit: Limit = 20,
    after: Annotated[
        str | None, Query(pattern=JOB_ID_PATTERN.pattern, description="job id cursor")
    ] = None,
) -> JobList:
    """Jobs newest first; pass the last id of a page as `after` for the next page."""
    jobs, has_more = await jobs_service.read_jobs_page(
        reads, status=status, limit=limit, after=after, tenant=principal.scope
    )
    return JobList(data=jobs, has_more=has_more)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
async def get_job(
    job_id: str,
    reads: ReadsDep,
    database: DatabaseDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> JobPublic:
    """The job; while queued its `queue_position`, while running its `estimated_finish`."""
    # The hottest read: in the event loop on PostgreSQL (app/reads.py).
    job = await jobs_service.read_job(reads, job_id=job_id, tenant=principal.scope)
    public = JobPublic.model_validate(job)
    if job.status == "queued":
        public.queue_position = await run_in_threadpool(
            estimates.queue_position, database, job=job, policy=Policy.of(settings)
        )
    elif job.status in estimates.RUNNING_STATUSES:
        public.estimated_finish = await estimates.estimated_finish(reads, job=job)
    return public


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={**ERRORS, **error_responses({409: "the job has already finished"})},
)
def cancel_job(
    job_id: str, session: SessionDep, redis_client: RedisDep, principal: PrincipalDep
) -> JobPublic:
    """A queued job is cancelled at once; a running one stops at its next optimizer step."""
    job = jobs_service.request_cancel(session, job_id=job_id, tenant=principal.scope)
    session.commit()
    ring(redis_client, [job_id])
    return JobPublic.model_validate(job)


@router.post(
    "/{job_id}/pause",
    response_model=JobPublic,
    responses={**ERRORS, **error_responses({409: "the job has finished or is cancelling"})},
)
def pause_job(
    job_id: str, session: SessionDep, redis_client: RedisDep, principal: PrincipalDep
) -> JobPublic:
    """A queued job is paused at once; a running one is `pausing` until its next optimizer
    step, where it checkpoints, frees its device and is `paused`. Paused jobs keep their
    checkpoints and resume exactly where they stopped."""
    job = jobs_service.request_pause(session, job_id=job_id, tenant=principal.scope)
    session.commit()
    ring(redis_client, [job_id])
    return JobPublic.model_validate(job)


@router.post(
    "/{job_id}/resume",
    response_model=JobPublic,
    responses={**ERRORS, **error_responses({409: "the job has finished or is cancelling"})},
)
def resume_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    redis_client: RedisDep,
    principal: PrincipalDep,
) -> JobPublic:
    """A paused job goes back to `queued` and later resumes from its latest checkpoint; a
    `pausing` one runs on as if never paused. A queued or running job is unchanged."""
    resumed = jobs_service.request_resume(session, job_id=job_id, tenant=principal.scope)
    session.commit()
    ring(redis_client, [job_id])
    send_jobs(session, resumed.to_send, send=training_sender(celery, settings.queue))
    return JobPublic.model_validate(resumed.job)


@router.get("/{job_id}/metrics", response_model=MetricList, responses=ERRORS)
def list_metrics(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after_step: StepCursor = None,
    limit: StepsLimit = 100,
) -> MetricList:
    """Per-optimizer-step metrics in step order."""
    rows, has_more = jobs_service.job_rows(
        session, JobMetric.step, after_step, job_id=job_id, limit=limit, tenant=principal.scope
    )
    return MetricList(data=rows, has_more=has_more)


EventTypes = Annotated[
    list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]] | None,
    Query(max_length=20, description="only events of these types, e.g. type=status&type=error"),
]
EventCursor = Annotated[int | None, Query(ge=0, le=MAX_INT64, description="event id cursor")]
MetricsBacklog = Annotated[
    int | None,
    Query(
        ge=10,
        le=10_000,
        description="stream only: of the stored metrics events, send at most this many, "
        "evenly spaced, the newest tenth exact (all other events in full); then live ones",
    ),
]


def _streamed_job_finished(job_id: str, session: SessionDep, principal: PrincipalDep) -> bool:
    # 404 (another tenant's job included) before the stream starts. The stream lasts as
    # long as the job and reads through the hub: the request's session closes before it
    # starts (SessionDep), so a stream holds no slot nor connection of the short routes.
    job = jobs_service.get_job(session, job_id=job_id, tenant=principal.scope)
    return job.status in TERMINAL_STATUSES


@router.get(
    "/{job_id}/events/stream",
    response_class=EventStreamResponse,
    response_description="Server-Sent Events: `id:` the event id, `event:` its type, "
    "`data:` the event as JSON",
    responses=ERRORS,
)
async def stream_events(
    job_id: str,
    request: Request,
    finished: Annotated[bool, Depends(_streamed_job_finished)],
    after: EventCursor = None,
    metrics_backlog: MetricsBacklog = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: the stored events after `Last-Event-ID` (or `after`), then live
    ones; keep-alive comments while idle; ends after the job's terminal status event.
    `metrics_backlog` thins the stored metrics to a chart's worth."""
    last_id = parse_last_event_id(request.headers.get("last-event-id"))
    state = request.app.state
    async for event in job_event_stream(
        hub=state.hub,
        database=state.database,
        job_id=job_id,
        finished_before=finished,
        after=last_id if last_id is not None else (after or 0),
        keepalive_seconds=state.settings.stream_keepalive_seconds,
        metrics_backlog=metrics_backlog,
    ):
        yield event


# `/events` asking for `text/event-stream` is the stream above; before the JSON route.
router.add_api_route(
    "/{job_id}/events",
    stream_events,
    response_class=EventStreamResponse,
    route_class_override=AcceptsEventStream,
    include_in_schema=False,
)


@router.get("/{job_id}/events", response_model=EventList, responses=ERRORS)
def list_events(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after: EventCursor = None,
    limit: Limit = 100,
    type: EventTypes = None,
    metrics_backlog: MetricsBacklog = None,
) -> EventList:
    """The job's events, oldest first: status, metrics (one per step), checkpoint,
    oom_backoff, overflow_skip, warning, error. With `Accept: text/event-stream`, a live
    stream of them (see `/events/stream`)."""
    only = [JobEvent.type.in_(type)] if type else []
    rows, has_more = jobs_service.job_rows(
        session, JobEvent.id, after, job_id=job_id, limit=limit, tenant=principal.scope, where=only
    )
    return EventList(data=rows, has_more=has_more)


@router.get("/{job_id}/attempts", response_model=AttemptList, responses=ERRORS)
def list_attempts(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT32, description="attempt number cursor")
    ] = None,
    limit: Limit = 100,
) -> AttemptList:
    """Every run of the job, oldest first: worker, times, step resumed from, why it ended."""
    rows, has_more = jobs_service.job_rows(
        session, JobAttempt.attempt, after, job_id=job_id, limit=limit, tenant=principal.scope
    )
    return AttemptList(data=rows, has_more=has_more)
