"""HTTP routes of uploaded files: upload (streamed), list, read, download, delete."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.auth.deps import PrincipalDep
from app.blobs import default_store
from app.db import Database
from app.deps import CeleryDep, DatabaseDep, Limit, SessionDep, SettingsDep
from app.errors import error_responses
from app.files import service as files_service
from app.files.exceptions import UploadInterrupted
from app.files.formats import FORMATS
from app.files.models import DataFile
from app.files.multipart import FileData, FileStart, FormField, read_form
from app.files.schemas import PURPOSE, FileList, FilePublic, FileStatus
from app.ids import FILE_ID_PATTERN
from app.queue import enqueue_validation
from app.settings import Settings

PATH = "/v1/files"
router = APIRouter(
    prefix=PATH,
    tags=["files"],
    responses=error_responses({401: "an API key is needed, or it is unknown or revoked"}),
)
ERRORS = error_responses({404: "no such file", 422: "invalid request"})

UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "additionalProperties": False,
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "format": {
                        "type": "string",
                        "enum": list(FORMATS),
                        "description": "default: from the file's name (.jsonl/.json, .csv, .npz)",
                    },
                    "purpose": {
                        "type": "string",
                        "enum": [PURPOSE],
                        "description": "OpenAI's upload field: every file here is training data",
                    },
                },
            }
        }
    },
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=FilePublic,
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        422: ERRORS[422],
        **error_responses({413: "the file is larger than TRAINJOB_MAX_FILE_BYTES"}),
    },
)
async def upload_file(
    request: Request,
    database: DatabaseDep,
    settings: SettingsDep,
    celery: CeleryDep,
    principal: PrincipalDep,
) -> FilePublic:
    """Upload a data file as multipart/form-data (a part `file`, optionally `format`, and
    OpenAI's `purpose`, which can only be `fine-tune`). It
    is stored as it arrives and comes back `validating`; a worker then checks it once
    and sets `valid` or `invalid` with the errors found."""
    data_file = await _store_and_commit(request, database, settings, tenant=principal.tenant)
    await run_in_threadpool(
        enqueue_validation, celery, file_id=data_file.id, queue=settings.files_queue
    )
    return FilePublic.model_validate(data_file)


async def _store_and_commit(
    request: Request, database: Database, settings: Settings, *, tenant: str
) -> DataFile:
    """Take the body's file while it arrives, then store its row (and, with the database
    store, its bytes) in one transaction of its own; on any failure keep nothing. No
    session is open while the client sends: a slow upload holds no connection, and on
    SQLite no write lock that every submit would wait behind. The file work runs in the
    thread pool a chunk at a time, so that the event loop only parses."""
    explicit_format: str | None = None
    upload: files_service.Upload | None = None
    events = read_form(
        request.stream(),
        request.headers.get("content-type", ""),
        file_field="file",
        fields=("format", "purpose"),
        max_file_bytes=settings.max_file_bytes,
    )
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, FormField) and event.name == "purpose":
                    files_service.check_purpose(event.value)  # refused at once if not ours
                elif isinstance(event, FormField):  # `format`: refuse a bad one at once
                    explicit_format = files_service.check_format(event.value)
                elif isinstance(event, FileStart):
                    upload = await run_in_threadpool(
                        files_service.Upload,
                        store=default_store(settings.files_dir),
                        tenant=tenant,
                        filename=event.filename,
                    )
                else:
                    assert isinstance(event, FileData) and upload is not None
                    await run_in_threadpool(upload.write, event.data)
        assert upload is not None  # read_form saw the file part
        file_format = files_service.upload_format(explicit_format, upload.row.filename)
        return await run_in_threadpool(_commit, database, upload, file_format)
    except BaseException as error:
        with anyio.CancelScope(shield=True):  # a cancelled request still cleans up
            if upload is not None:
                await run_in_threadpool(upload.discard)
        if isinstance(error, ClientDisconnect):  # nobody to answer; nothing to log
            raise UploadInterrupted("the client went away before the file was sent") from None
        raise


def _commit(database: Database, upload: files_service.Upload, file_format: str) -> DataFile:
    with database.sessions.begin() as session:  # an error rolls back
        return upload.finish(session, format=file_format)


@router.get("", response_model=FileList, responses=ERRORS)
def list_files(
    session: SessionDep,
    principal: PrincipalDep,
    status: FileStatus | None = None,
    limit: Limit = 20,
    after: Annotated[
        str | None, Query(pattern=FILE_ID_PATTERN.pattern, description="file id cursor")
    ] = None,
) -> FileList:
    """Files newest first; pass the last id of a page as `after` for the next page."""
    rows, has_more = files_service.list_files(
        session, limit=limit, after=after, status=status, tenant=principal.scope
    )
    return FileList(data=rows, has_more=has_more)


@router.get("/{file_id}", response_model=FilePublic, responses=ERRORS)
def get_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> FilePublic:
    data_file = files_service.get_file(session, file_id=file_id, tenant=principal.scope)
    return FilePublic.model_validate(data_file)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
def download_file(
    file_id: str,
    session: SessionDep,
    database: DatabaseDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """The file's bytes as uploaded."""
    data_file = files_service.get_file(session, file_id=file_id, tenant=principal.scope)
    # The body streams after this request's session has closed, a chunk per transaction:
    # a client that reads slowly holds no connection.
    chunks = database.read_piecewise(
        lambda session: files_service.read_content(
            session, data_file=data_file, files_dir=settings.files_dir
        )
    )
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": attachment(data_file.filename),
            "Content-Length": str(data_file.size_bytes),
        },
    )


@router.delete(
    "/{file_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**ERRORS, **error_responses({409: "a queued or running job uses the file"})},
)
def delete_file(
    file_id: str, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """Delete the file and its bytes; 409 while a queued or running job uses it."""
    files_service.delete_file(
        session, file_id=file_id, files_dir=settings.files_dir, tenant=principal.scope
    )
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def attachment(filename: str) -> str:
    """A Content-Disposition that cannot break the header: an ASCII name without quotes
    or backslashes, and the real one percent-encoded (RFC 6266)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
