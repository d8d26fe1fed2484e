"""Errors of the files API; each renders as the error envelope."""

from __future__ import annotations

from app.errors import AppError, Conflict, InvalidRequest, NotFound


class FileNotFound(NotFound):
    type = "file_not_found"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"no file {file_id!r}", file_id=file_id)


class FileInUse(Conflict):
    type = "file_in_use"

    def __init__(self, file_id: str, job_ids: list[str]) -> None:
        super().__init__(
            f"file {file_id} is used by queued or running jobs ({', '.join(job_ids)}); "
            "delete it once they have finished or been cancelled",
            file_id=file_id,
            job_ids=job_ids,
        )


class BadUpload(InvalidRequest):
    """A multipart body that is not one file upload: the envelope names the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", fields=[{"path": field, "message": message}])


class UploadInterrupted(AppError):
    type = "upload_interrupted"
