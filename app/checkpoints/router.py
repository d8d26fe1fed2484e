"""HTTP routes of checkpoints and weights downloads."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.auth.deps import PrincipalDep
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
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
def download_weights(
    job_id: str,
    session: SessionDep,
    database: DatabaseDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    step: StepCursor = None,
) -> StreamingResponse:
    """The model weights as safetensors: the final weights once the job succeeded
    (its last checkpoint), else the latest checkpoint, or the one at `step`."""
    checkpoint = checkpoints_service.find_checkpoint(
        session, job_id=job_id, step=step, tenant=principal.scope
    )
    # The body streams after this request's session has closed, a chunk per transaction:
    # a client that reads slowly holds no connection.
    chunks = database.read_piecewise(
        lambda session: checkpoints_service.read_part(
            session, checkpoint=checkpoint, part="weights", checkpoint_dir=settings.checkpoint_dir
        )
    )
    filename = f"{job_id}-step-{checkpoint.step}.safetensors"
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(checkpoint.weights_bytes),
            "X-Checkpoint-Step": str(checkpoint.step),
        },
    )
