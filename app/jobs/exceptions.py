from __future__ import annotations

from app.errors import Conflict, NotFound


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}", job_id=job_id)


class JobAlreadyFinished(Conflict):
    type = "job_finished"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} is already {status}", job_id=job_id, status=status)
