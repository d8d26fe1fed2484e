"""The files API over HTTP: upload, list, read, download, delete, on both databases and
with the directory store; bad bodies are 4xx with the envelope and store nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth import service as auth_service
from app.blobs import CHUNK_BYTES
from app.db import Database, upgrade
from app.files.models import DataFile, FileChunk, JobFile
from app.jobs import service as jobs_service
from app.jobs.spec import JobSpec
from app.main import create_app
from app.queue import VALIDATE_TASK
from app.settings import Settings
from tests.app.files.uploads import CONTENT_TYPE, multipart
from tests.conftest import REDIS_URL

SPEC = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "batch_size": 8,
        "micro_batch_size": 8, "max_steps": 3}  # fmt: skip
MAX_FILE_BYTES = 4096


def upload(client: TestClient, name: str, data: bytes, **form: str) -> Any:
    return client.post("/v1/files", files={"file": (name, data)}, data=form or None)


def chunk_sizes(database: Database, file_id: str) -> list[int]:
    with database.session() as session:
        return list(
            session.scalars(
                select(func.length(FileChunk.data))
                .where(FileChunk.file_id == file_id)
                .order_by(FileChunk.seq)
            )
        )


def stored(database: Database) -> tuple[int, int]:
    """How many files and chunks the database holds: what a refused upload must not change
    (the Postgres database is shared by the session's tests, so counts, not lists)."""
    with database.session() as session:
        files = session.scalar(select(func.count()).select_from(DataFile)) or 0
        return files, session.scalar(select(func.count()).select_from(FileChunk)) or 0


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """A client of the API on changed settings (the reaper off, as in `client`)."""
    with contextlib.ExitStack() as stack:

        def make(**changes: Any) -> TestClient:
            changed = settings.model_copy(update={"reaper_interval_seconds": 0, **changes})
            return stack.enter_context(TestClient(create_app(changed)))

        yield make


def test_an_upload_round_trips_through_get_list_and_content_in_chunks_of_at_most_4_mib(
    client: TestClient, database: Database
) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    response = upload(client, "corpus.jsonl", data)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("file_") and len(created["id"]) == 29
    assert created["filename"] == "corpus.jsonl" and created["format"] == "jsonl"
    assert created["status"] == "validating" and created["kind"] is None
    assert created["size_bytes"] == len(data)
    assert created["sha256"] == hashlib.sha256(data).hexdigest()
    assert created["errors"] == [] and created["stats"] is None
    assert created["validated_at"] is None and created["tenant"] == "default"
    assert client.get(f"/v1/files/{created['id']}").json() == created
    assert client.get("/v1/files", params={"limit": 1}).json()["data"] == [created]
    assert chunk_sizes(database, created["id"]) == [CHUNK_BYTES, CHUNK_BYTES, 12345]
    content = client.get(f"/v1/files/{created['id']}/content")
    assert content.status_code == 200 and content.content == data
    assert content.headers["content-length"] == str(len(data))
    assert content.headers["content-type"] == "application/octet-stream"
    assert content.headers["content-disposition"].startswith('attachment; filename="corpus.jsonl"')


def test_an_openai_upload_with_purpose_fine_tune_keeps_the_native_fields_and_adds_openai_s(
    client: TestClient,
) -> None:
    response = upload(client, "train.jsonl", b'{"text": "hi"}\n', purpose="fine-tune")
    assert response.status_code == 201, response.text
    created = response.json()
    # The native contract unchanged (created_at stays an ISO string), OpenAI's fields added.
    assert created["size_bytes"] == 15 and created["format"] == "jsonl"
    assert isinstance(created["created_at"], str) and "T" in created["created_at"]
    assert (created["object"], created["bytes"], created["purpose"]) == ("file", 15, "fine-tune")
    assert client.get(f"/v1/files/{created['id']}").json() == created


def test_the_directory_store_writes_one_file_and_no_chunks(
    make_client: Callable[..., TestClient], database: Database, tmp_path: Path
) -> None:
    files_dir = tmp_path / "files"
    client = make_client(files_dir=files_dir)
    data = os.urandom(CHUNK_BYTES + 99)
    created = upload(client, "table.csv", data).json()
    assert created["format"] == "csv" and created["size_bytes"] == len(data)
    assert [path.name for path in files_dir.iterdir()] == [created["id"]]
    assert (files_dir / created["id"]).read_bytes() == data
    assert chunk_sizes(database, created["id"]) == []
    assert client.get(f"/v1/files/{created['id']}/content").content == data
    assert client.delete(f"/v1/files/{created['id']}").status_code == 204
    assert list(files_dir.iterdir()) == []


def test_after_the_commit_the_file_is_sent_to_the_workers_for_validation(
    client: TestClient, redis_client: redis.Redis, queue_name: str
) -> None:
    created = upload(client, "a.jsonl", b'{"text": "hi"}\n').json()
    # Validations have a queue of their own (TRAINJOB_FILES_QUEUE), not the training one.
    messages = [json.loads(raw) for raw in redis_client.lrange(f"{queue_name}-files", 0, -1)]
    sent = [m for m in messages if m["headers"]["id"].startswith(f"{created['id']}:")]
    assert len(sent) == 1
    assert sent[0]["headers"]["task"] == VALIDATE_TASK
    assert sent[0]["headers"]["argsrepr"] == repr([created["id"]])


@pytest.mark.parametrize(
    ("name", "form", "expected"),
    [
        ("data.jsonl", {}, "jsonl"),
        ("data.json", {}, "jsonl"),
        ("DATA.CSV", {}, "csv"),
        ("images.npz", {}, "npz"),
        ("export.txt", {"format": "csv"}, "csv"),
        ("rows.jsonl", {"format": "npz"}, "npz"),  # what the uploader says wins
    ],
)
def test_the_format_comes_from_the_name_unless_given(
    client: TestClient, name: str, form: dict[str, str], expected: str
) -> None:
    response = upload(client, name, b"x", **form)
    assert response.status_code == 201, response.text
    assert response.json()["format"] == expected


def test_the_format_field_may_come_after_the_file(client: TestClient) -> None:
    body = b"".join(multipart("export.txt", [b"1,2\n"]))
    tail = f"--{CONTENT_TYPE.split('=')[1]}--\r\n".encode()
    field = b'Content-Disposition: form-data; name="format"\r\n\r\ncsv\r\n'
    body = body[: -len(tail)] + tail[:-4] + b"\r\n" + field + tail
    response = client.post("/v1/files", content=body, headers={"content-type": CONTENT_TYPE})
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "csv" and response.json()["size_bytes"] == 4


@pytest.mark.parametrize(
    ("name", "form", "message"),
    [
        ("notes.txt", {}, "cannot tell the format from the name 'notes.txt'"),
        ("data", {}, "cannot tell the format"),
        ("data.jsonl", {"format": "parquet"}, "'parquet' is not one of jsonl, csv, npz"),
    ],
)
def test_an_unknown_format_is_a_422_naming_the_field_and_stores_nothing(
    client: TestClient, database: Database, name: str, form: dict[str, str], message: str
) -> None:
    before = stored(database)
    response = upload(client, name, b"payload", **form)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert error["fields"][0]["path"] == "format" and message in error["fields"][0]["message"]
    assert stored(database) == before


def raw_body(parts: list[tuple[str, str | None, bytes]], *, closed: bool = True) -> bytes:
    boundary = CONTENT_TYPE.split("=")[1]
    body = b""
    for name, filename, value in parts:
        named = f'; filename="{filename}"' if filename is not None else ""
        disposition = f'Content-Disposition: form-data; name="{name}"{named}'
        body += f"--{boundary}\r\n{disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + (f"--{boundary}--\r\n".encode() if closed else b"")


@pytest.mark.parametrize(
    ("body", "content_type", "path", "message"),
    [
        (b'{"file": "x"}', "application/json", "file", "multipart/form-data"),
        (raw_body([("format", None, b"csv")]), CONTENT_TYPE, "file", "missing"),
        (
            raw_body([("file", "a.csv", b"1"), ("file", "b.csv", b"2")]),
            CONTENT_TYPE,
            "file",
            "one file per upload",
        ),
        (
            raw_body([("file", "a.csv", b"1"), ("colour", None, b"x")]),
            CONTENT_TYPE,
            "colour",
            "unknown field",
        ),
        (
            raw_body([("purpose", None, b"batch"), ("file", "a.csv", b"1")]),
            CONTENT_TYPE,
            "purpose",
            "'batch' is not supported: every trainjob file is training data",
        ),
        (
            raw_body([("file", "a.csv", b"1,2\n3,4\n")], closed=False),
            CONTENT_TYPE,
            "body",
            "ended before the closing multipart boundary",
        ),
        (b"garbage", CONTENT_TYPE, "body", "not a valid multipart/form-data body"),
        (
            raw_body([("file", "a.csv", b"1"), ("format", None, b"c" * 20_000)]),
            CONTENT_TYPE,
            "body",
            "beside the file exceed",
        ),
    ],
    ids=[
        "json",
        "no-file",
        "two-files",
        "unknown-field",
        "purpose-not-fine-tune",
        "cut-short",
        "garbage",
        "big-field",
    ],
)
def test_a_body_that_is_not_one_file_upload_is_a_422_and_stores_nothing(
    client: TestClient,
    database: Database,
    body: bytes,
    content_type: str,
    path: str,
    message: str,
) -> None:
    before = stored(database)
    response = client.post("/v1/files", content=body, headers={"content-type": content_type})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert error["fields"][0]["path"] == path and message in error["fields"][0]["message"]
    assert stored(database) == before


def test_an_empty_file_is_accepted_for_validation_to_judge(client: TestClient) -> None:
    response = upload(client, "empty.jsonl", b"")
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["size_bytes"] == 0 and created["status"] == "validating"
    assert created["sha256"] == hashlib.sha256(b"").hexdigest()
    assert client.get(f"/v1/files/{created['id']}/content").content == b""


def assert_too_large(response: Any, refused: str) -> None:
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": {
            "type": "payload_too_large",
            "message": response.json()["error"]["message"],
            "limit_bytes": MAX_FILE_BYTES,
        }
    }
    message = response.json()["error"]["message"]
    assert message == f"{refused} is larger than {MAX_FILE_BYTES} bytes"


def test_a_file_over_the_cap_is_a_413_with_or_without_content_length_and_stores_nothing(
    make_client: Callable[..., TestClient], database: Database, tmp_path: Path
) -> None:
    files_dir = tmp_path / "files"
    for store in ({}, {"files_dir": files_dir}):
        client = make_client(max_file_bytes=MAX_FILE_BYTES, **store)
        before = stored(database)
        exactly = upload(client, "cap.csv", b"x" * MAX_FILE_BYTES)
        assert exactly.status_code == 201, exactly.text
        # Just over: the body passes the middleware (it allows the multipart envelope) and
        # the upload is refused when the file passes the cap.
        assert_too_large(upload(client, "over.csv", b"x" * (MAX_FILE_BYTES + 1)), "the file")
        # Far over: refused from its Content-Length before a byte is read.
        far = upload(client, "far.csv", b"x" * (1024 * 1024))
        assert_too_large(far, "the request body")
        # Chunked, no Content-Length.
        chunked = client.post(
            "/v1/files",
            content=multipart("chunked.csv", (b"x" * 1000 for _ in range(10))),
            headers={"content-type": CONTENT_TYPE},
        )
        assert "content-length" not in chunked.request.headers
        assert_too_large(chunked, "the file")
        assert client.delete(f"/v1/files/{exactly.json()['id']}").status_code == 204
        assert stored(database) == before
    assert list(files_dir.iterdir()) == []  # no .partial left behind


def post_upload_asgi(
    app: Any, messages: Callable[[int], dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """POST /v1/files straight to the ASGI app, the n-th receive() answered by
    `messages(n)`: what the app sent, and how many messages it asked for."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return messages(pulled)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", CONTENT_TYPE.encode())],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80), "app": app,
    }  # fmt: skip
    anyio.run(app, scope, receive, send)
    return sent, pulled


HEAD = next(multipart("endless.csv", []))


def more(body: bytes) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": True}


def test_a_chunked_upload_over_the_cap_stops_being_read_at_the_cap(
    make_client: Callable[..., TestClient],
) -> None:
    # A body that never ends: the answer must come anyway, having read little past the cap.
    app = make_client(max_file_bytes=MAX_FILE_BYTES).app
    sent, pulled = post_upload_asgi(
        app,
        lambda n: {
            "type": "http.request",
            "body": HEAD if n == 1 else b"y" * 1000,
            "more_body": True,
        },
    )
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["type"] == "payload_too_large"
    assert pulled - 1 == MAX_FILE_BYTES // 1000 + 1  # the message that passed the cap


def test_a_client_that_goes_away_mid_upload_leaves_nothing_behind(
    make_client: Callable[..., TestClient], database: Database, tmp_path: Path
) -> None:
    files_dir = tmp_path / "files"
    for store in ({}, {"files_dir": files_dir}):
        app = make_client(**store).app
        before = stored(database)

        def messages(n: int) -> dict[str, Any]:
            if n <= 3:  # the head and two chunks' worth, stored; then the client is gone
                return more(HEAD if n == 1 else os.urandom(CHUNK_BYTES))
            return {"type": "http.disconnect"}

        post_upload_asgi(app, messages)
        assert stored(database) == before
    assert list(files_dir.iterdir()) == []


def test_a_file_a_queued_job_uses_cannot_be_deleted_until_the_job_is_over(
    client: TestClient, database: Database
) -> None:
    created = upload(client, "a.jsonl", b'{"text": "hi"}\n').json()
    with database.session() as session:
        job = jobs_service.create_job(session, spec=JobSpec.model_validate(SPEC))
        session.add(JobFile(job_id=job.id, file_id=created["id"], role="train"))
        session.commit()
    refused = client.delete(f"/v1/files/{created['id']}")
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["type"] == "file_in_use" and error["job_ids"] == [job.id]
    assert job.id in error["message"]
    assert client.get(f"/v1/files/{created['id']}").status_code == 200
    assert client.post(f"/v1/jobs/{job.id}/cancel").json()["status"] == "cancelled"
    deleted = client.delete(f"/v1/files/{created['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    for path in ("", "/content"):
        gone = client.get(f"/v1/files/{created['id']}{path}")
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "file_not_found"
    assert chunk_sizes(database, created["id"]) == []
    with database.session() as session:  # the job keeps its record; the link went
        assert session.get(JobFile, (job.id, created["id"])) is None


@pytest.mark.parametrize("file_id", ["file_0123456789abcdef01234567", "nope", "job_x", "%00"])
def test_an_unknown_file_is_a_404_everywhere(client: TestClient, file_id: str) -> None:
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["type"] in {"file_not_found", "not_found"}


def test_the_list_pages_newest_first_and_filters_by_status(
    client: TestClient, database: Database
) -> None:
    ids = [upload(client, f"f{n}.csv", b"1").json()["id"] for n in range(3)]
    first = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == [ids[2], ids[1]] and first["has_more"] is True
    rest = client.get("/v1/files", params={"limit": 1, "after": ids[1]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]]
    validating = client.get("/v1/files", params={"status": "validating", "limit": 3}).json()
    assert [f["id"] for f in validating["data"]] == ids[::-1]
    with database.session() as session:
        session.get_one(DataFile, ids[1]).status = "valid"
        session.commit()
    valid = client.get("/v1/files", params={"status": "valid", "limit": 1}).json()
    assert [f["id"] for f in valid["data"]] == [ids[1]]
    bad_cursor = client.get("/v1/files", params={"after": "job_1"})
    assert bad_cursor.status_code == 422


def test_the_filename_is_kept_without_directories_or_control_characters(
    client: TestClient,
) -> None:
    # Sent as raw bytes: httpx would percent-encode the quotes and the control character.
    name = '../../etc/d\u00e9j\u00e0 \\"vu\\"\u202e\x7f.jsonl'
    body = b"".join(multipart(name, [b"1"]))
    created = client.post("/v1/files", content=body, headers={"content-type": CONTENT_TYPE}).json()
    assert created["filename"] == 'd\u00e9j\u00e0 "vu".jsonl'
    content = client.get(f"/v1/files/{created['id']}/content")
    assert content.headers["content-disposition"] == (
        "attachment; filename=\"d_j_ _vu_.jsonl\"; filename*=UTF-8''d%C3%A9j%C3%A0%20%22vu%22.jsonl"
    )
    long = upload(client, "x" * 400 + ".csv", b"1").json()
    assert long["filename"] == "x" * 251 + ".csv" and long["format"] == "csv"


def test_a_tenant_sees_and_deletes_only_its_own_files(
    make_postgres_database: Callable[[], str], queue_name: str, tmp_path: Path
) -> None:
    # A database of its own: keys turn authentication on for every user of a database.
    own_database = Database(make_postgres_database())
    upgrade(own_database.url)
    with own_database.session() as session:
        keys = {
            tenant: auth_service.create_key(session, tenant=tenant, admin=tenant == "ops")[1]
            for tenant in ("acme", "bravo", "ops")
        }
        session.commit()
    settings = Settings(
        home=tmp_path / "home",
        database_url=own_database.url,
        redis_url=REDIS_URL,
        queue=queue_name,
        files_queue=f"{queue_name}-files",
        reaper_interval_seconds=0,
    )
    as_ = {tenant: {"authorization": f"Bearer {key}"} for tenant, key in keys.items()}
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/files", files={"file": ("a.csv", b"1")}).status_code == 401
        mine = client.post("/v1/files", files={"file": ("a.csv", b"1")}, headers=as_["acme"]).json()
        assert mine["tenant"] == "acme"
        for method, path in [
            ("GET", f"/v1/files/{mine['id']}"),
            ("GET", f"/v1/files/{mine['id']}/content"),
            ("DELETE", f"/v1/files/{mine['id']}"),
        ]:
            response = client.request(method, path, headers=as_["bravo"])
            assert response.status_code == 404 and "acme" not in response.text
        assert client.get("/v1/files", headers=as_["bravo"]).json()["data"] == []
        assert [f["id"] for f in client.get("/v1/files", headers=as_["acme"]).json()["data"]] == [
            mine["id"]
        ]
        assert [f["id"] for f in client.get("/v1/files", headers=as_["ops"]).json()["data"]] == [
            mine["id"]
        ]
        assert client.get(f"/v1/files/{mine['id']}", headers=as_["acme"]).status_code == 200
        assert client.delete(f"/v1/files/{mine['id']}", headers=as_["acme"]).status_code == 204
    own_database.dispose()
