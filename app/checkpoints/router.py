"""HTTP routes of checkpoints and weights downloads."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.auth.deps import PrincipalDep
from app.checkpoints import adapters
from app.checkpoints import service as checkpoints_service
from app.checkpoints.models import Checkpoint
from app.checkpoints.schemas import CheckpointList
from app.deps import DatabaseDep, SessionDep, SettingsDep, StepCursor, StepsLimit
from app.errors import error_responses
from app.jobs import service as jobs_service

router = APIRouter(
    prefix="/v1/jobs",
    tags=["checkpoints"],
    responses=error_responses({401: "an API key is needed, or it is unknown or revoked"}),
)
ERRORS = error_responses({404: "no such job or checkpoint", 422: "invalid request"})
WEIGHTS_ERRORS = error_responses(
    {
        404: "no such job or checkpoint",
        409: "format=peft on a job without LoRA, or merged=true on a checkpoint without them",
        422: "invalid request",
    }
)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=ERRORS)
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after_step: StepCursor = None,
    limit: StepsLimit = 100,
) -> CheckpointList:
    rows, has_more = jobs_service.job_rows(
        session, Checkpoint.step, after_step, job_id=job_id, limit=limit, tenant=principal.scope
    )
    return CheckpointList(data=rows, has_more=has_more)


@router.get(
    "/{job_id}/weights",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}, "application/zip": {}}},
        **WEIGHTS_ERRORS,
    },
)
def download_weights(
    job_id: str,
    session: SessionDep,
    database: DatabaseDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    step: StepCursor = None,
    format: checkpoints_service.WeightsFormat | None = None,
    merged: bool = False,
) -> StreamingResponse:
    """The model weights as safetensors: the final weights once the job succeeded
    (its last checkpoint), else the latest checkpoint, or the one at `step`.

    A LoRA job's weights are its adapter, as a zip of peft's adapter_model.safetensors
    and adapter_config.json (`format=peft`, the default) or the safetensors alone
    (`format=safetensors`); `merged=true` gives the base with the adapter merged in, which
    the final checkpoint has."""
    download = checkpoints_service.weights_download(
        session,
        job_id=job_id,
        step=step,
        tenant=principal.scope,
        format=format,
        merged=merged,
        checkpoint_dir=settings.checkpoint_dir,
    )
    checkpoint = download.checkpoint
    # The body streams after this request's session has closed, a chunk per transaction:
    # a client that reads slowly holds no connection.
    chunks = database.read_piecewise(
        lambda session: checkpoints_service.read_part(
            session,
            checkpoint=checkpoint,
            part=download.part,
            checkpoint_dir=settings.checkpoint_dir,
        )
    )
    media_type = "application/octet-stream"
    if download.adapter_config is not None:
        media_type = "application/zip"
        chunks = adapters.stream_zip(
            [
                (adapters.ADAPTER_WEIGHTS_NAME, download.size, chunks),
                (
                    adapters.ADAPTER_CONFIG_NAME,
                    len(download.adapter_config),
                    [download.adapter_config],
                ),
            ],
            modified=checkpoint.created_at,
        )
    return StreamingResponse(
        chunks,
        media_type=media_type,
        headers={
            "Content-Disposition": f'attachment; filename="{download.filename}"',
            "Content-Length": str(download.body_size),
            "X-Checkpoint-Step": str(checkpoint.step),
        },
    )
