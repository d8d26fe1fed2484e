"""The command-line client against a real API and worker (subprocesses, Postgres, Redis).

Most commands run in this process through `main(argv)` with their output captured;
the acceptance path, `trainjob submit SPEC --watch`, runs as a real `trainjob`
process. The reconnect test talks to a scripted HTTP server, since breaking the real
API's stream on cue would need killing it mid-job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.main import build_parser, main
from tests.conftest import StartService, wait_for
from tests.processes import (
    TRAINJOB,
    free_port,
    service_env,
    wait_for_status,
)

# Small enough to train in about a second on one CPU thread.
SPEC: dict[str, Any] = {
    "name": "cli test",
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 8,
    "checkpoint_every": 4,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "device": "cpu",
}
# 40 samples, 4 held out: an epoch is a window of 32 = 8 × 4, then a partial one of 4.
PARTIAL_LAST_WINDOW = {
    **SPEC,
    "name": "partial last window",
    "dataset": {"type": "synthetic-classification", "n_samples": 40, "n_features": 8},
    "micro_batch_size": 8,
    "accumulation_steps": 4,
    "max_steps": None,
    "epochs": 1,
    "checkpoint_every": 0,
}
# Trains until cancelled.
ENDLESS = {**SPEC, "name": "endless", "max_steps": 1_000_000, "checkpoint_every": 0}
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Service:
    url: str
    http: httpx.Client


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[Service]:
    with start_service("cli", progress_flush_seconds="0.2", reaper_interval_seconds="2") as http:
        yield Service(url=str(http.base_url).rstrip("/"), http=http)


@pytest.fixture
def trainjob(service: Service, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """`trainjob ARGS --url <the service>` in this process: exit code, stdout, stderr."""

    def run(*args: str) -> Result:
        code = main([*args, "--url", service.url])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def finished_job(service: Service) -> dict[str, Any]:
    job = service.http.post("/v1/jobs", json=SPEC).json()
    done = wait_for_status(service.http, job["id"], TERMINAL, timeout=60)
    assert done["status"] == "succeeded", done["error"]
    return done


def running_job(service: Service) -> dict[str, Any]:
    job = service.http.post("/v1/jobs", json=ENDLESS).json()

    def training() -> bool:
        current = service.http.get(f"/v1/jobs/{job['id']}").json()
        return current["status"] == "running" and current["progress"]["step"] > 0

    wait_for(training, 60, "the endless job to train", interval=0.1)
    return job  # type: ignore[no-any-return]


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(json.dumps(spec))
    return path


# --- submit and watch ----------------------------------------------------------------


def test_submit_watch_follows_the_job_and_exits_0_with_the_final_loss(
    service: Service, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "spec.json", SPEC)
    watched = subprocess.run(
        [*TRAINJOB, "submit", str(spec), "--watch", "--url", service.url],
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    job = service.http.get(f"/v1/jobs/{lines[0]}").json()
    assert job["status"] == "succeeded"
    # Not a terminal: a plain line per step (8 steps → every step), no ANSI codes.
    assert "\033" not in watched.stdout and "\r" not in watched.stdout
    assert any(line.startswith("step 8/8 [") and "samples/s" in line for line in lines)
    assert lines[-1] == (
        f"{job['id']} succeeded: step 8/8, final loss {job['metrics']['loss']:.4f}, "
        f"elapsed {lines[-1].rsplit(' ', 1)[-1]}"
    )
    assert re.search(r"elapsed \d+:\d\d:\d\d$", lines[-1])


def test_watch_of_a_cancelled_job_exits_1_with_its_outcome(
    service: Service, trainjob: Callable[..., Result]
) -> None:
    job = running_job(service)
    cancelled = trainjob("cancel", job["id"])
    assert cancelled.code == 0 and cancelled.out.startswith(f"{job['id']} cancelling")
    watched = trainjob("watch", job["id"])
    assert watched.code == 1
    assert f"{job['id']} cancelled: step" in watched.out.splitlines()[-1]
    assert watched.err.startswith("trainjob: cancelled")


def test_watch_of_a_finished_job_prints_its_outcome_at_once(
    finished_job: dict[str, Any], trainjob: Callable[..., Result]
) -> None:
    watched = trainjob("watch", finished_job["id"], "--json")
    assert watched.code == 0
    assert json.loads(watched.out) == finished_job


# --- status, list, events, download ---------------------------------------------------


def test_status_summarises_the_job(
    finished_job: dict[str, Any], trainjob: Callable[..., Result]
) -> None:
    shown = trainjob("status", finished_job["id"])
    assert shown.code == 0
    assert shown.out.splitlines()[0] == f"{finished_job['id']}  cli test"
    assert "status    succeeded" in shown.out
    assert "priority  500" in shown.out
    assert "queue " not in shown.out and "eta " not in shown.out  # neither once finished
    assert "step      8/8" in shown.out
    assert f"loss      {finished_job['metrics']['loss']:.4f}" in shown.out
    assert "batch     8 = 4 × 2" in shown.out and "partial" not in shown.out
    assert "attempts  1 of 3" in shown.out
    assert "error     -" in shown.out


def test_status_json_is_the_servers_job(
    finished_job: dict[str, Any], trainjob: Callable[..., Result]
) -> None:
    shown = trainjob("status", finished_job["id"], "--json")
    assert shown.code == 0 and json.loads(shown.out) == finished_job


def test_list_json_is_the_servers_page_and_the_table_lists_the_same_jobs(
    service: Service, finished_job: dict[str, Any], trainjob: Callable[..., Result]
) -> None:
    listed = trainjob("list", "--status", "succeeded", "--limit", "100", "--json")
    assert listed.code == 0
    page = json.loads(listed.out)
    assert set(page) == {"data", "has_more"}
    assert page == service.http.get("/v1/jobs?status=succeeded&limit=100").json()
    assert finished_job in page["data"]

    table = trainjob("list", "--status", "succeeded").out.splitlines()
    assert table[0].split() == ["ID", "STATUS", "STEP", "LOSS", "BATCH", "CREATED", "NAME"]
    row = next(line for line in table if line.startswith(finished_job["id"]))
    assert row.split()[1:5] == [
        "succeeded",
        "8/8",
        f"{finished_job['metrics']['loss']:.4f}",
        "8=4×2",
    ]


def test_after_a_partial_last_window_status_shows_the_full_split_and_flags_it(
    service: Service, trainjob: Callable[..., Result]
) -> None:
    job = service.http.post("/v1/jobs", json=PARTIAL_LAST_WINDOW).json()
    done = wait_for_status(service.http, job["id"], TERMINAL, timeout=60)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["step"] == 2 and done["progress"]["samples_seen"] == 36
    assert (done["batch_size"], done["micro_batch_size"], done["accumulation_steps"]) == (32, 8, 4)
    assert done["progress"]["last_window_samples"] == 4

    shown = trainjob("status", job["id"])
    assert "batch     32 = 8 × 4 (last window partial: 4 of 32 samples)" in shown.out
    table = trainjob("list").out.splitlines()
    assert next(line for line in table if line.startswith(job["id"])).split()[4] == "32=8×4"


def test_list_pages_with_after(
    service: Service, finished_job: dict[str, Any], trainjob: Callable[..., Result]
) -> None:
    newest = service.http.get("/v1/jobs?limit=2").json()["data"]
    assert len(newest) == 2  # this module has submitted more than one job by now
    after = trainjob("list", "--limit", "1", "--after", newest[0]["id"], "--json")
    assert [job["id"] for job in json.loads(after.out)["data"]] == [newest[1]["id"]]
    more = trainjob("list", "--limit", "1")
    assert f"more: trainjob list --after {newest[0]['id']}" in more.err


def test_events_json_is_every_event_of_the_job(
    service: Service, finished_job: dict[str, Any], trainjob: Callable[..., Result]
) -> None:
    shown = trainjob("events", finished_job["id"], "--json")
    assert shown.code == 0
    events = json.loads(shown.out)
    stored = service.http.get(f"/v1/jobs/{finished_job['id']}/events?limit=100").json()
    assert events == {"data": stored["data"], "has_more": False}
    types = [event["type"] for event in events["data"]]
    assert types[0] == "status" and types.count("checkpoint") == 2
    assert events["data"][-1]["data"]["status"] == "succeeded"

    later = trainjob("events", finished_job["id"], "--after", str(events["data"][1]["id"]))
    assert [int(line.split()[0]) for line in later.out.splitlines()] == [
        event["id"] for event in events["data"][2:]
    ]


def test_download_writes_the_bytes_of_get_weights(
    service: Service,
    finished_job: dict[str, Any],
    trainjob: Callable[..., Result],
    tmp_path: Path,
) -> None:
    target = tmp_path / "weights.safetensors"
    downloaded = trainjob("download", finished_job["id"], "-o", str(target))
    assert downloaded.code == 0
    expected = service.http.get(f"/v1/jobs/{finished_job['id']}/weights").content
    assert target.read_bytes() == expected
    assert downloaded.out.strip() == f"{target} ({len(expected):,} bytes, step 8)"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_download_of_a_step_is_named_after_it_by_default(
    service: Service,
    finished_job: dict[str, Any],
    trainjob: Callable[..., Result],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    downloaded = trainjob("download", finished_job["id"], "--step", "4", "--json")
    assert downloaded.code == 0
    target = tmp_path / f"{finished_job['id']}-step4.safetensors"
    expected = service.http.get(f"/v1/jobs/{finished_job['id']}/weights?step=4").content
    assert target.read_bytes() == expected
    assert json.loads(downloaded.out) == {
        "path": target.name,
        "size_bytes": len(expected),
        "step": 4,
    }


def test_download_of_a_missing_checkpoint_is_an_error_and_writes_nothing(
    service: Service, finished_job: dict[str, Any], trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    target = tmp_path / "never.safetensors"
    downloaded = trainjob("download", finished_job["id"], "--step", "3", "-o", str(target))
    error = service.http.get(f"/v1/jobs/{finished_job['id']}/weights?step=3").json()["error"]
    assert downloaded.code == 1
    assert downloaded.err.strip() == f"trainjob: {error['type']}: {error['message']}"
    assert list(tmp_path.iterdir()) == []


# --- cancel ---------------------------------------------------------------------------


def test_cancel_of_a_queued_job_then_again_is_the_servers_conflict(
    service: Service, trainjob: Callable[..., Result]
) -> None:
    # The worker runs one job at a time: behind a running one, the next stays queued.
    blocker = running_job(service)
    queued = service.http.post("/v1/jobs", json=SPEC).json()
    try:
        first = trainjob("cancel", queued["id"])
        assert first.code == 0 and first.out.strip() == f"{queued['id']} cancelled"
        again = trainjob("cancel", queued["id"])
        answer = service.http.post(f"/v1/jobs/{queued['id']}/cancel")
        message = answer.json()["error"]
        assert answer.status_code == 409 and again.code == 1 and again.out == ""
        assert again.err.strip() == f"trainjob: {message['type']}: {message['message']}"
    finally:
        service.http.post(f"/v1/jobs/{blocker['id']}/cancel")
    wait_for_status(service.http, blocker["id"], TERMINAL, timeout=10)


def test_pause_and_resume_of_a_queued_job_then_of_a_finished_one(
    service: Service, trainjob: Callable[..., Result]
) -> None:
    blocker = running_job(service)  # the one worker is busy: the next job stays queued
    queued = service.http.post("/v1/jobs", json=SPEC).json()
    try:
        paused = trainjob("pause", queued["id"])
        assert paused.code == 0 and paused.out.strip() == f"{queued['id']} paused"
        resumed = trainjob("resume", queued["id"], "--json")
        assert resumed.code == 0 and json.loads(resumed.out)["status"] == "queued"
        service.http.post(f"/v1/jobs/{queued['id']}/cancel")
        again = trainjob("resume", queued["id"])
        message = service.http.post(f"/v1/jobs/{queued['id']}/resume").json()["error"]
        assert again.code == 1 and again.out == ""
        assert again.err.strip() == f"trainjob: {message['type']}: {message['message']}"
        pausing = trainjob("pause", blocker["id"])
        assert pausing.code == 0 and pausing.out.startswith(f"{blocker['id']} pausing: ")
    finally:
        service.http.post(f"/v1/jobs/{blocker['id']}/cancel")
    wait_for_status(service.http, blocker["id"], TERMINAL, timeout=30)


# --- errors and exit codes ------------------------------------------------------------


def test_an_unknown_job_exits_1_with_the_servers_not_found_message(
    service: Service, trainjob: Callable[..., Result]
) -> None:
    for command in ("status", "watch", "cancel", "pause", "resume", "events", "download"):
        result = trainjob(command, "job_doesnotexist")
        assert result.code == 1, command
        message = service.http.get("/v1/jobs/job_doesnotexist").json()["error"]["message"]
        assert result.err.strip() == f"trainjob: not_found: {message}", command


def test_a_rejected_spec_exits_1_with_one_line_per_bad_field(
    service: Service, trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    bad = {**SPEC, "micro_batch_size": 0, "colour": "blue"}
    submitted = trainjob("submit", str(write_spec(tmp_path / "bad.json", bad)))
    assert submitted.code == 1 and submitted.out == ""
    error = service.http.post("/v1/jobs", json=bad).json()["error"]
    assert submitted.err.splitlines() == [
        f"trainjob: validation_error: {error['message']}",
        *(f"  {field['path']}: {field['message']}" for field in error["fields"]),
    ]
    assert {field["path"] for field in error["fields"]} >= {"micro_batch_size", "colour"}


def test_a_spec_that_cannot_be_read_exits_2_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # a request would exit 3
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, expected in [
        ("missing.json", "cannot read"),
        ("broken.yaml", "is not valid YAML"),
        ("list.json", "must hold one object"),
    ]:
        assert main(["submit", str(tmp_path / name), "--url", nowhere]) == 2, name
        assert expected in capsys.readouterr().err, name


def test_an_unreachable_server_exits_3_naming_the_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "job_x", "--url", nowhere]) == 3
    assert capsys.readouterr().err.startswith(f"trainjob: cannot reach the server at {nowhere}")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as missing_id:
        main(["download"])
    assert missing_id.value.code == 2
    assert main(["status", "job_x", "--url", "localhost:8000"]) == 2
    assert "--url must start with http://" in capsys.readouterr().err


def test_client_flags_are_taken_before_the_command_as_well_as_after_it(
    service: Service, finished_job: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = finished_job["id"]
    assert main(["--url", service.url, "status", job_id]) == 0
    assert capsys.readouterr().out.startswith(job_id)
    assert main(["--json", "--url", service.url, "status", job_id]) == 0
    assert json.loads(capsys.readouterr().out) == finished_job
    assert main(["--url", service.url, "files", "list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"data", "has_more"}
    # Given twice, the one after the command wins.
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["--url", nowhere, "status", job_id, "--url", service.url]) == 0
    assert main(["--url", service.url, "status", job_id, "--url", nowhere]) == 3
    parsed = build_parser().parse_args(["--api-key", "k1", "--json", "list"])
    assert (parsed.api_key, parsed.as_json, parsed.url) == ("k1", True, None)
    parsed = build_parser().parse_args(["--api-key", "k1", "list", "--api-key", "k2"])
    assert (parsed.api_key, parsed.as_json) == ("k2", False)


def test_help_shows_the_client_flags_and_server_commands_refuse_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    assert shown.value.code == 0
    usage = capsys.readouterr().out
    assert "trainjob [-h] [--url URL] [--api-key KEY] [--json] COMMAND" in usage
    with pytest.raises(SystemExit) as refused:
        main(["--url", "http://127.0.0.1:8000", "serve"])
    assert refused.value.code == 2
    assert "--url is for the client commands" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["status", "ID", "--json"], ["list"], ["events", "ID"]],
    ids=" ".join,
)
def test_a_reader_that_closes_early_ends_the_command_quietly(
    service: Service, finished_job: dict[str, Any], command: list[str]
) -> None:
    args = [finished_job["id"] if part == "ID" else part for part in command]
    process = subprocess.Popen(
        [*TRAINJOB, *args, "--url", service.url],
        env=service_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    # As `trainjob ... | head -n 1` once head has its line: nobody reads any more.
    # Closed before the command can print, so that its every write finds the pipe shut.
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait(timeout=30) == 141, errors  # 128 + SIGPIPE, as a shell reports
    assert errors == ""


def test_submit_reads_yaml_and_prints_only_the_id(
    service: Service, trainjob: Callable[..., Result], tmp_path: Path
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {type: mlp, hidden_sizes: [8]}\ndataset: {type: digits}\n"
        "micro_batch_size: 4\naccumulation_steps: 1\nmax_steps: 2\ndevice: cpu\n"
    )
    submitted = trainjob("submit", str(spec))
    assert submitted.code == 0
    job_id = submitted.out.strip()
    assert service.http.get(f"/v1/jobs/{job_id}").json()["spec"]["max_steps"] == 2
    wait_for_status(service.http, job_id, TERMINAL, timeout=30)


def test_the_url_comes_from_trainjob_url(
    service: Service,
    finished_job: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRAINJOB_URL", service.url)
    assert main(["status", finished_job["id"]]) == 0
    assert "succeeded" in capsys.readouterr().out


def test_the_client_runs_without_torch(service: Service, finished_job: dict[str, Any]) -> None:
    script = (
        "import sys\n"
        "from cli.main import main\n"
        f"code = main(['status', {finished_job['id']!r}, '--url', {service.url!r}])\n"
        "assert 'torch' not in sys.modules and 'app.main' not in sys.modules\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=service_env(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_the_client_modules_import_neither_torch_nor_the_worker() -> None:
    script = (
        "import sys\n"
        "import cli.client, cli.files, cli.jobs, cli.main, cli.output, cli.progress, cli.specfile\n"
        "loaded = {name.split('.')[0] for name in sys.modules}\n"
        "assert not loaded & {'torch', 'worker', 'celery', 'sqlalchemy'}, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- watch's reconnect and the API key, against a scripted server ---------------------


class ScriptedApi(BaseHTTPRequestHandler):
    """A job that runs, a stream that drops after two events, then one that ends it."""

    requests: list[dict[str, str]]
    streams_served: int

    def do_GET(self) -> None:
        type(self).requests.append({"path": self.path, **dict(self.headers.items())})
        if self.path.endswith("/events"):
            type(self).streams_served += 1
            if type(self).streams_served == 1:
                self._send("text/event-stream", STREAM_BEFORE_DROP)
            else:
                self._send("text/event-stream", STREAM_AFTER_RECONNECT)
        else:
            finished = type(self).streams_served >= 2
            job = SCRIPTED_FINISHED_JOB if finished else SCRIPTED_JOB
            self._send("application/json", json.dumps(job).encode())

    def _send(self, content_type: str, body: bytes) -> None:
        # HTTP/1.0 with no length: the body ends where the connection closes, as a
        # dropped stream does.
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


SCRIPTED_JOB = {
    "id": "job_scripted",
    "status": "running",
    "batch_size": 8,
    "progress": {"step": 1, "max_steps": 4},
    "metrics": {"loss": 0.5},
    "runtime_seconds": 3.0,
    "error": None,
}
SCRIPTED_FINISHED_JOB = {
    **SCRIPTED_JOB,
    "status": "succeeded",
    "progress": {"step": 4, "max_steps": 4},
}
STREAM_BEFORE_DROP = (
    b"retry: 10\r\n\r\n: keep-alive\r\n\r\n"
    b'id: 1\r\nevent: status\r\ndata: {"status": "running"}\r\n\r\n'
    b'id: 2\r\nevent: metrics\r\ndata: {"step": 2, "loss": 1.0, "samples_per_sec": 80}\r\n\r\n'
    b'id: 3\r\nevent: metrics\r\ndata: {"step": 3, '  # cut off mid-event
)
STREAM_AFTER_RECONNECT = (
    b'id: 3\nevent: metrics\ndata: {"step": 3, "loss": 0.75, "samples_per_sec": 80}\n\n'
    b'id: 4\nevent: metrics\ndata: {"step": 4, "loss": 0.5, "samples_per_sec": 80}\n\n'
    b'id: 5\nevent: status\ndata: {"status": "succeeded"}\n\n'
)


@pytest.fixture
def scripted_api() -> Iterator[tuple[str, type[ScriptedApi]]]:
    handler = type("Handler", (ScriptedApi,), {"requests": [], "streams_served": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


def test_watch_reconnects_after_the_last_event_id_it_saw(
    scripted_api: tuple[str, type[ScriptedApi]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, handler = scripted_api
    monkeypatch.setenv("TRAINJOB_API_KEY", "sekrit-key")
    assert main(["watch", "job_scripted", "--url", url]) == 0
    streams = [request for request in handler.requests if request["path"].endswith("/events")]
    assert [stream.get("Last-Event-ID") for stream in streams] == [None, "2"]
    assert all(stream["Accept"] == "text/event-stream" for stream in streams)
    # The key goes to the server on every request, and nowhere else.
    assert all(request["Authorization"] == "Bearer sekrit-key" for request in handler.requests)
    out = capsys.readouterr()
    assert "sekrit" not in out.out + out.err
    lines = out.out.splitlines()
    assert lines[0] == "status: running"
    assert [line.split(" [")[0] for line in lines if line.startswith("step")] == [
        "step 2/4",
        "step 3/4",
        "step 4/4",
    ]
    # ETA from the server's rate: 2 steps × 8 samples at 80 samples/s.
    assert "ETA 0:00:00" in lines[1] and "loss 1.0000" in lines[1]
    assert lines[-1] == "job_scripted succeeded: step 4/4, final loss 0.5000, elapsed 0:00:03"
