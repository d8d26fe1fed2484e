"""`trainjob files upload|list|rm` against a real API and worker (subprocesses, Postgres,
Redis): the worker validates what the CLI uploads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cli.main import main
from tests.cli.test_client import Result
from tests.conftest import StartService

MAX_FILE_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service("files-cli", max_file_bytes=str(MAX_FILE_BYTES)) as client:
        yield client


@pytest.fixture
def trainjob(service: httpx.Client, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        code = main([*args, "--url", str(service.base_url)])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_upload_prints_the_file_and_json_prints_the_servers_object(
    trainjob: Callable[..., Result], service: httpx.Client, tmp_path: Path
) -> None:
    path = write(tmp_path / "notes.jsonl", ['{"text": "hello"}'])
    shown = trainjob("files", "upload", str(path))
    assert shown.code == 0, shown.err
    file_id, name, file_format, size, *_ = shown.out.split()
    assert (name, file_format, size) == ("notes.jsonl", "jsonl", "18")
    assert service.get(f"/v1/files/{file_id}").json()["filename"] == "notes.jsonl"
    as_json = trainjob("files", "upload", str(path), "--json")
    assert as_json.code == 0
    created = json.loads(as_json.out)
    assert created["size_bytes"] == 18 and created["format"] == "jsonl"
    assert service.get(f"/v1/files/{created['id']}/content").content == path.read_bytes()


def test_upload_wait_exits_0_once_the_worker_finds_the_file_valid(
    trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    path = write(tmp_path / "corpus.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    result = trainjob("files", "upload", str(path), "--wait", "--json")
    assert result.code == 0, result.err
    validated = json.loads(result.out)
    assert validated["status"] == "valid" and validated["kind"] == "text"
    assert validated["stats"]["rows"] == 2


def test_upload_wait_exits_1_with_the_errors_of_an_invalid_file(
    trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    path = write(tmp_path / "broken.jsonl", ['{"text": "fine"}', "{not json"])
    result = trainjob("files", "upload", str(path), "--wait")
    assert result.code == 1
    assert "invalid" in result.out.splitlines()[-1]
    assert "is invalid:" in result.err and "line 2" in result.err


def test_the_format_can_be_given_for_a_name_that_does_not_say_it(
    trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    path = write(tmp_path / "export.txt", ["x,label", "1.0,0"])
    refused = trainjob("files", "upload", str(path))
    assert refused.code == 1 and "format: cannot tell the format" in refused.err
    given = trainjob("files", "upload", str(path), "--format", "csv", "--json")
    assert given.code == 0 and json.loads(given.out)["format"] == "csv"


@pytest.mark.parametrize(
    ("size", "refused"),
    [(MAX_FILE_BYTES + 1, "the file"), (8 * MAX_FILE_BYTES, "the request body")],
    ids=["refused-mid-body", "refused-from-content-length"],
)
def test_a_file_over_the_servers_cap_is_its_413(
    trainjob: Callable[..., Result], tmp_path: Path, size: int, refused: str
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * size)
    result = trainjob("files", "upload", str(path))
    assert result.code == 1
    assert f"payload_too_large: {refused} is larger than {MAX_FILE_BYTES} bytes" in result.err


def test_a_path_that_cannot_be_read_exits_2_before_any_request(
    trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    result = trainjob("files", "upload", str(tmp_path / "missing.jsonl"))
    assert result.code == 2 and "cannot read" in result.err


def test_list_shows_the_files_newest_first_and_json_is_the_servers_page(
    trainjob: Callable[..., Result], service: httpx.Client, tmp_path: Path
) -> None:
    path = write(tmp_path / "listed.csv", ["x,label", "1.0,0"])
    created = json.loads(trainjob("files", "upload", str(path), "--json").out)
    table = trainjob("files", "list")
    assert table.code == 0
    header, first, *_ = table.out.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "FORMAT"]
    assert first.startswith(created["id"]) and first.endswith("listed.csv")
    page = json.loads(trainjob("files", "list", "--json", "--limit", "1").out)
    assert page == service.get("/v1/files", params={"limit": 1}).json()
    assert page["data"][0]["id"] == created["id"]


def test_rm_deletes_the_file_and_a_second_rm_is_the_servers_not_found(
    trainjob: Callable[..., Result], service: httpx.Client, tmp_path: Path
) -> None:
    path = write(tmp_path / "gone.jsonl", ['{"text": "bye"}'])
    file_id = json.loads(trainjob("files", "upload", str(path), "--json").out)["id"]
    removed = trainjob("files", "rm", file_id)
    assert removed.code == 0 and removed.out.strip() == f"{file_id} deleted"
    assert service.get(f"/v1/files/{file_id}").status_code == 404
    again = trainjob("files", "rm", file_id)
    assert again.code == 1 and f"file_not_found: no file '{file_id}'" in again.err
