"""HTTP routes of the OpenAI-compatible fine-tuning API (`/v1/fine_tuning/jobs`) and the
download of a fine-tuned model by name (`/v1/models/{name}/weights`).

Each route calls the native route of the same action (submit, read, list, cancel, pause,
resume) as a function, so that a job is checked, stored, sent, woken and read exactly as
the native API does it, and renders the native answer through `mapping`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.deps import PrincipalDep
from app.db import Database
from app.deps import (
    CeleryDep,
    DatabaseDep,
    Limit,
    ReadsDep,
    ReaperDep,
    RedisDep,
    SessionDep,
    SettingsDep,
)
from app.errors import InvalidRequest, error_responses, field_errors
from app.ids import JOB_ID_PATTERN
from app.jobs import router as jobs_router
from app.jobs.schemas import JobPublic
from app.jobs.spec import JobSpec
from app.openai_compat import mapping
from app.openai_compat import service as openai_service
from app.openai_compat.exceptions import Unsupported
from app.openai_compat.schemas import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
)

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["openai"],
    responses=error_responses({401: "an API key is needed, or it is unknown or revoked"}),
)
models_router = APIRouter(
    prefix="/v1/models",
    tags=["openai"],
    responses=error_responses({401: "an API key is needed, or it is unknown or revoked"}),
)
ERRORS = error_responses({404: "no such job", 422: "invalid request"})
STOP_ERRORS = {**ERRORS, **error_responses({409: "the job has finished or is cancelling"})}

JobCursor = Annotated[
    str | None, Query(pattern=JOB_ID_PATTERN.pattern, description="job id cursor")
]
EventCursor = Annotated[
    str | None, Query(pattern=mapping.EVENT_ID.pattern, description="event id cursor")
]
CheckpointCursor = Annotated[
    str | None, Query(pattern=mapping.CHECKPOINT_ID.pattern, description="checkpoint id cursor")
]


def _rendered(session: Session, jobs: list[JobPublic]) -> list[FineTuningJob]:
    """The jobs in OpenAI's shape; one query finds the queued ones that wait for files."""
    queued = [job.id for job in jobs if job.status == "queued"]
    waiting = openai_service.waiting_for_files(session, job_ids=queued)
    return [mapping.render_job(job, waiting_for_files=job.id in waiting) for job in jobs]


def _rendered_apart(database: Database, jobs: list[JobPublic]) -> list[FineTuningJob]:
    # For the async reads, in the thread pool: a session of its own, closed at once.
    with database.session() as session:
        return _rendered(session, jobs)


def _in_openai_terms(fields: list[dict[str, str]], *, hyperparameters_at: str) -> InvalidRequest:
    """A native validation error with each field renamed to the OpenAI field it came from
    (one the mapping fixed is named as the native spec's)."""
    for field in fields:
        param = mapping.openai_param(field["path"], hyperparameters_at=hyperparameters_at)
        field["path"] = param or f"(native spec) {field['path']}"
    summary = "; ".join(f"{f['path']}: {f['message']}" for f in fields[:5])
    return InvalidRequest(summary, fields=fields)


@router.post(
    "",
    response_model=FineTuningJob,
    responses={
        **ERRORS,
        **error_responses(
            {
                403: "a priority above the key's, or the tenant's quota used up",
                422: "an invalid or unsupported field, or a training file that is unknown, "
                "invalid or does not fit the model",
                429: "the tenant has too many queued and running jobs",
            }
        ),
    },
)
def create_job(
    body: FineTuningJobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    redis_client: RedisDep,
    principal: PrincipalDep,
    reaper: ReaperDep,
) -> FineTuningJob:
    """Create a fine-tuning job (docs/openai.md maps each field to the native spec)."""
    at, _ = mapping.hyperparameters_of(body)
    try:
        spec = JobSpec.model_validate(mapping.native_spec(body))
    except ValidationError as error:
        fields = field_errors([dict(item) for item in error.errors()])
        raise _in_openai_terms(fields, hyperparameters_at=at) from None
    try:
        job = jobs_router.submit_job(
            spec, response, session, settings, celery, redis_client, principal, reaper
        )
    except InvalidRequest as error:  # the training files: unknown, invalid, misfit
        native_fields: list[dict[str, str]] | None = error.details.get("fields")
        if not native_fields:
            raise
        raise _in_openai_terms(native_fields, hyperparameters_at=at) from None
    return _rendered(session, [job])[0]


def _refuse_metadata_filter(request: Request) -> None:
    if any(name.startswith("metadata") for name in request.query_params):
        raise Unsupported("metadata", "filtering the list by metadata is not supported")


@router.get("", response_model=FineTuningJobList, responses=ERRORS)
async def list_jobs(
    request: Request,
    reads: ReadsDep,
    database: DatabaseDep,
    principal: PrincipalDep,
    after: JobCursor = None,
    limit: Limit = 20,
) -> FineTuningJobList:
    """The tenant's jobs newest first (every job, native ones too); `after`: the last id
    of the previous page."""
    _refuse_metadata_filter(request)
    page = await jobs_router.list_jobs(reads, principal, status=None, limit=limit, after=after)
    data = await run_in_threadpool(_rendered_apart, database, page.data)
    return FineTuningJobList(data=data, has_more=page.has_more)


@router.get("/{job_id}", response_model=FineTuningJob, responses=ERRORS)
async def retrieve_job(
    job_id: str,
    reads: ReadsDep,
    database: DatabaseDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> FineTuningJob:
    """The job, with its `estimated_finish` while it runs."""
    job = await jobs_router.get_job(job_id, reads, database, settings, principal)
    return (await run_in_threadpool(_rendered_apart, database, [job]))[0]


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=STOP_ERRORS)
def cancel_job(
    job_id: str, session: SessionDep, redis_client: RedisDep, principal: PrincipalDep
) -> FineTuningJob:
    """A queued or paused job is cancelled at once; a running one at its next step."""
    job = jobs_router.cancel_job(job_id, session, redis_client, principal)
    return _rendered(session, [job])[0]


@router.post("/{job_id}/pause", response_model=FineTuningJob, responses=STOP_ERRORS)
def pause_job(
    job_id: str, session: SessionDep, redis_client: RedisDep, principal: PrincipalDep
) -> FineTuningJob:
    """A queued job is paused at once; a running one checkpoints at its next step."""
    job = jobs_router.pause_job(job_id, session, redis_client, principal)
    return _rendered(session, [job])[0]


@router.post("/{job_id}/resume", response_model=FineTuningJob, responses=STOP_ERRORS)
def resume_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    redis_client: RedisDep,
    principal: PrincipalDep,
) -> FineTuningJob:
    """A paused job is queued again and resumes from its latest checkpoint."""
    job = jobs_router.resume_job(job_id, session, settings, celery, redis_client, principal)
    return _rendered(session, [job])[0]


@router.get("/{job_id}/events", response_model=FineTuningJobEventList, responses=ERRORS)
def list_events(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after: EventCursor = None,
    limit: Limit = 20,
) -> FineTuningJobEventList:
    """The job's events newest first; `after`: the last id of the previous page."""
    before = int(match.group(1)) if after and (match := mapping.EVENT_ID.match(after)) else None
    rows, has_more = openai_service.events_page(
        session, job_id=job_id, tenant=principal.scope, before=before, limit=limit
    )
    data = [
        mapping.render_event(
            native_id=row.id, type=row.type, data=row.data, created_at=row.created_at
        )
        for row in rows
    ]
    return FineTuningJobEventList(data=data, has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList, responses=ERRORS)
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after: CheckpointCursor = None,
    limit: Limit = 10,
) -> FineTuningJobCheckpointList:
    """The job's checkpoints newest first, each with the model name that downloads it."""
    match = mapping.CHECKPOINT_ID.match(after) if after else None
    if match is not None and match.group(1) != job_id:
        raise InvalidRequest(
            f"after: {after} is a checkpoint of another job",
            fields=[{"path": "after", "message": "a checkpoint of another job"}],
        )
    job, rows, has_more = openai_service.checkpoints_page(
        session,
        job_id=job_id,
        tenant=principal.scope,
        before_step=int(match.group(2)) if match else None,
        limit=limit,
    )
    name = mapping.fine_tuned_model_name(spec=job.spec, tenant=job.tenant, job_id=job.id)
    data = [
        mapping.render_checkpoint(
            job_id=job.id,
            model_name=name,
            step=row.step,
            loss=row.loss,
            eval_loss=row.eval_loss,
            created_at=row.created_at,
        )
        for row in rows
    ]
    return FineTuningJobCheckpointList(data=data, has_more=has_more)


@models_router.get(
    "/{name:path}/weights",
    status_code=307,
    response_class=RedirectResponse,
    responses=error_responses({404: "no such fine-tuned model of this tenant"}),
)
def fine_tuned_model_weights(
    name: str, session: SessionDep, principal: PrincipalDep
) -> RedirectResponse:
    """A fine-tuned model's weights by its name (a job's `fine_tuned_model`, or a
    checkpoint's `fine_tuned_model_checkpoint`): a redirect to the job's native
    `/v1/jobs/{id}/weights` (with `?step=` for a checkpoint)."""
    path = openai_service.weights_path(session, name=name, tenant=principal.scope)
    return RedirectResponse(path, status_code=307)
