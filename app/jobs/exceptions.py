from __future__ import annotations

from app.errors import AppError, Conflict, InvalidRequest, NotFound


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}", job_id=job_id)


class JobAlreadyFinished(Conflict):
    type = "job_finished"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} is already {status}", job_id=job_id, status=status)


class TooManyJobs(AppError):
    status_code = 429
    type = "too_many_jobs"
    headers = {"Retry-After": "30"}  # noqa: RUF012

    def __init__(self, tenant: str, active: int) -> None:
        super().__init__(
            f"tenant {tenant!r} has {active} queued or running jobs, the most allowed; "
            "retry when some have finished"
        )


class CudaNotSeen(InvalidRequest):
    """A spec asks for CUDA and no live worker of the queue has it: it would fail at start."""

    def __init__(self) -> None:
        message = (
            "device 'cuda' was requested but no live worker has CUDA; use device 'auto' or "
            "'cpu', or start a GPU worker (TRAINJOB_ALLOW_UNSEEN_CUDA=true queues it anyway)"
        )
        super().__init__(message, fields=[{"path": "device", "message": message}])


class IdempotencyKeyReused(Conflict):
    type = "idempotency_key_reused"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was used with a different body; use a new key",
            idempotency_key=key,
        )


class TrackingNotConfigured(InvalidRequest):
    """A spec asks for MLflow tracking on a service with no tracking server configured."""

    def __init__(self) -> None:
        message = (
            "MLflow tracking was requested but this service has no tracking server: the "
            "operator sets TRAINJOB_MLFLOW_TRACKING_URI (for the API and the workers); "
            "leave tracking out to train without it"
        )
        super().__init__(message, fields=[{"path": "tracking", "message": message}])
