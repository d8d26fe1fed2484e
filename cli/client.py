"""The command-line client: `trainjob submit/status/list/watch/cancel/events/download`
(and `trainjob files`, in cli/files.py).

It talks to the HTTP API only (no torch, no database), so it runs from the API-only
install. Exit codes: 0 success, 1 the server answered an error or a watched job
failed or was cancelled, 2 a usage error or an unreadable spec, 3 no server at the URL
(and 141, from cli/main.py, when the reader of stdout went away).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, connect_sse
from pydantic import ValidationError

from app.jobs.schemas import TERMINAL_STATUSES
from app.settings import Settings
from cli import output
from cli.progress import TrainingProgress
from cli.specfile import SpecFileError, read_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# A stream that drops is reopened this many times in a row before we give up; any
# event received resets the count.
RECONNECT_ATTEMPTS = 6
RECONNECT_MAX_DELAY_SECONDS = 10.0
# The server sends keep-alive comments far more often than this; silence this long
# means the connection is gone even if no socket error says so.
STREAM_READ_TIMEOUT_SECONDS = 60.0
REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ApiError(Exception):
    """The server answered with an error envelope (or some other non-2xx)."""

    def __init__(self, type: str, message: str, fields: list[dict[str, Any]]) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.fields = fields


class Unreachable(Exception):
    """No answer from the server at the URL: refused, timed out, or dropped."""


class UsageError(Exception):
    """The command cannot be sent as given: a bad --url, an unreadable file."""


@dataclass
class Api:
    """One server: its URL and an httpx client carrying the API key, if any. Every
    answer goes through raise_for_error (an httpx response hook), streams included."""

    url: str
    http: httpx.Client = field(repr=False)

    def get(self, path: str, **params: Any) -> Any:
        return _json(self.http.get(path, params={k: v for k, v in params.items() if v is not None}))

    def post(self, path: str, body: Any = None) -> Any:
        return _json(self.http.post(path, json=body))

    def unreachable(self, error: httpx.TransportError) -> Unreachable:
        reason = str(error) or type(error).__name__
        return Unreachable(f"cannot reach the server at {self.url}: {reason}")


def connect(url: str, api_key: str | None) -> Api:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, not {url!r}")
    headers = {"User-Agent": "trainjob-cli"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    http = httpx.Client(
        base_url=url,
        headers=headers,
        timeout=REQUEST_TIMEOUT,
        event_hooks={"response": [raise_for_error]},
    )
    return Api(url=url, http=http)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise _not_trainjob(response) from None


def raise_for_error(response: httpx.Response) -> None:
    """An error answer as ApiError: the server's envelope, or what we can say about it."""
    if response.is_success:
        return
    response.read()  # a streamed answer has not been read yet
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not (isinstance(error, dict) and "type" in error and "message" in error):
        raise _not_trainjob(response)
    fields = error.get("fields")
    raise ApiError(
        str(error["type"]),
        str(error["message"]),
        [item for item in fields if isinstance(item, dict)] if isinstance(fields, list) else [],
    )


def _not_trainjob(response: httpx.Response) -> ApiError:
    # A proxy's error page, or a server that is not trainjob at all.
    return ApiError(
        "http_error",
        f"HTTP {response.status_code} {response.reason_phrase} from {response.url} "
        f"({response.headers.get('content-type', 'no content type')})",
        [],
    )


def job_path(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/jobs", quote(job_id, safe=""), *rest])


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def show(document: Any, text: str, *, as_json: bool) -> None:
    """The server's JSON as one document (--json, for scripts), or the text for people."""
    print(json.dumps(document, indent=2) if as_json else text)


# --- commands ----------------------------------------------------------------------


def submit(api: Api, spec_path: str, *, watch_after: bool, as_json: bool) -> int:
    job = api.post("/v1/jobs", read_spec(spec_path))
    if watch_after:
        if not as_json:
            print(job["id"], flush=True)
        return watch(api, job["id"], as_json=as_json)
    show(job, job["id"], as_json=as_json)
    return EXIT_OK


def status(api: Api, job_id: str, *, as_json: bool) -> int:
    job = api.get(job_path(job_id))
    show(job, output.job_summary(job), as_json=as_json)
    return EXIT_OK


def list_jobs(
    api: Api, *, status: str | None, limit: int | None, after: str | None, as_json: bool
) -> int:
    page = api.get("/v1/jobs", status=status, limit=limit, after=after)
    return print_page(page, output.print_job_table, "jobs", status=status, as_json=as_json)


def print_page(
    page: dict[str, Any],
    print_table: Callable[[list[dict[str, Any]]], None],
    noun: str,
    *,
    status: str | None,
    as_json: bool,
) -> int:
    """A page of a list: the server's JSON, or a table and how to ask for the next page."""
    if as_json:
        print_json(page)
        return EXIT_OK
    if page["data"]:
        print_table(page["data"])
    else:
        print(f"no {noun}")
    if page["has_more"]:
        command = "trainjob list" if noun == "jobs" else f"trainjob {noun} list"
        more = f"{command} --after {page['data'][-1]['id']}"
        print(f"more: {more}" + (f" --status {status}" if status else ""), file=sys.stderr)
    return EXIT_OK


def cancel(api: Api, job_id: str, *, as_json: bool) -> int:
    job = api.post(job_path(job_id, "cancel"))
    if job["status"] == "cancelling":
        show(job, f"{job['id']} cancelling: it stops at its next optimizer step", as_json=as_json)
    else:
        show(job, f"{job['id']} {job['status']}", as_json=as_json)
    return EXIT_OK


def events(api: Api, job_id: str, *, after: int | None, as_json: bool) -> int:
    collected: list[dict[str, Any]] = []
    while True:
        page = api.get(job_path(job_id, "events"), after=after, limit=100)
        collected += page["data"]
        if not as_json:
            for event in page["data"]:
                print(output.event_line(event))
        if not page["has_more"] or not page["data"]:
            break
        after = page["data"][-1]["id"]
    if as_json:
        # All pages as one document of the server's own shape.
        print_json({"data": collected, "has_more": False})
    return EXIT_OK


def download(api: Api, job_id: str, *, out: Path | None, step: int | None, as_json: bool) -> int:
    default_name = (
        f"{job_id}-step{step}.safetensors" if step is not None else f"{job_id}.safetensors"
    )
    target = out if out is not None else Path(default_name)
    if target.is_dir():
        target = target / default_name
    params = {"step": step} if step is not None else {}
    with api.http.stream("GET", job_path(job_id, "weights"), params=params) as response:
        size = _write_atomically(target, response.iter_bytes())
    at_step = response.headers.get("X-Checkpoint-Step")
    step_text = f", step {at_step}" if at_step else ""
    show(
        {"path": str(target), "size_bytes": size, "step": int(at_step) if at_step else None},
        f"{target} ({size:,} bytes{step_text})",
        as_json=as_json,
    )
    return EXIT_OK


def _write_atomically(target: Path, chunks: Iterator[bytes]) -> int:
    """Write to a temporary file beside `target`, then rename: a dropped download never
    leaves a truncated file under the real name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part"
    )
    size = 0
    try:
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
                size += len(chunk)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private; the weights are as readable as any file we write.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return size


# --- watch -------------------------------------------------------------------------


def watch(api: Api, job_id: str, *, as_json: bool) -> int:
    """Follow a job's live events to its end; exit 0 if it succeeded, 1 if not."""
    job = api.get(job_path(job_id))
    if job["status"] not in TERMINAL_STATUSES:
        progress = None
        if not as_json:
            max_steps = job["progress"].get("max_steps")
            progress = TrainingProgress(
                total_steps=max_steps, batch_size=job["batch_size"], file=sys.stdout
            )
        try:
            _follow(api, job_id, progress)
        except KeyboardInterrupt:
            print(f"trainjob: stopped watching; {job_id} goes on", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            if progress is not None:
                progress.close()
        job = api.get(job_path(job_id))
    return _outcome(job, as_json=as_json)


def _outcome(job: dict[str, Any], *, as_json: bool) -> int:
    show(job, output.final_line(job), as_json=as_json)
    if job["status"] == "succeeded":
        return EXIT_OK
    error = job.get("error") or {"type": job["status"], "message": f"job {job['id']} was cancelled"}
    print(f"trainjob: {output.format_error(error)}", file=sys.stderr)
    return EXIT_FAILED


@dataclass
class StreamPosition:
    """Where a reconnect resumes: the id of the last whole event, and the server's
    `retry:` advice (milliseconds) for the delay."""

    last_event_id: str | None = None
    retry_ms: int | None = None


def _follow(api: Api, job_id: str, progress: TrainingProgress | None) -> None:
    """Read the event stream until the job's terminal status, reconnecting where it drops."""
    position = StreamPosition()
    failures = 0
    while True:
        received = False
        try:
            with contextlib.closing(_stream(api, job_id, position)) as stream:
                for event_type, data in stream:
                    received = True
                    if event_type == "status" and data.get("status") in TERMINAL_STATUSES:
                        return
                    if progress is not None:
                        _show(event_type, data, progress)
        except httpx.TransportError as error:
            reason = str(api.unreachable(error))
        else:
            reason = f"the event stream at {api.url} ended before the job did"
        # Perhaps the end came while we were away: a job that is over has nothing to stream.
        with contextlib.suppress(httpx.TransportError):
            if api.get(job_path(job_id))["status"] in TERMINAL_STATUSES:
                return
        failures = 1 if received else failures + 1
        if failures > RECONNECT_ATTEMPTS:
            raise Unreachable(reason)
        advised = position.retry_ms / 1000 if position.retry_ms is not None else 0.5
        time.sleep(min(RECONNECT_MAX_DELAY_SECONDS, advised * 2 ** (failures - 1)))


def _stream(
    api: Api, job_id: str, position: StreamPosition
) -> Generator[tuple[str, dict[str, Any]], None, None]:
    """One connection's events as (type, data); a reconnect resumes after the last id seen.

    httpx-sse yields only whole events: one cut off by a drop is asked for again.
    """
    headers = {}
    if position.last_event_id is not None:
        headers["Last-Event-ID"] = position.last_event_id
    timeout = httpx.Timeout(30.0, connect=5.0, read=STREAM_READ_TIMEOUT_SECONDS)
    with connect_sse(
        api.http, "GET", job_path(job_id, "events"), headers=headers, timeout=timeout
    ) as source:
        try:
            for event in source.iter_sse():
                if event.retry is not None:
                    position.retry_ms = event.retry
                if event.id:
                    position.last_event_id = event.id
                try:
                    data = json.loads(event.data)
                except ValueError:
                    continue  # not ours to show (a retry or keep-alive); the stream goes on
                if isinstance(data, dict):
                    yield event.event, data
        except SSEError:
            content_type = source.response.headers.get("content-type")
            raise ApiError(
                "no_event_stream",
                f"{api.url} answered {content_type or 'no content type'} instead of an event "
                "stream: is it an older trainjob server?",
                [],
            ) from None


def _show(event_type: str, data: dict[str, Any], progress: TrainingProgress) -> None:
    if event_type == "metrics":
        if isinstance(data.get("step"), int) and isinstance(data.get("loss"), int | float):
            progress.update(data["step"], data["loss"], data.get("samples_per_sec") or 0.0)
    elif (note := output.live_event_note(event_type, data)) is not None:
        progress.note(note)


# --- dispatch ----------------------------------------------------------------------


def client_command(args: argparse.Namespace) -> int:
    """Run one client subcommand; errors become a line on stderr and an exit code."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"trainjob: invalid settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    api_key = args.api_key
    if api_key is None and settings.api_key is not None:
        api_key = settings.api_key.get_secret_value()
    try:
        api = connect(args.url or settings.url, api_key)
        with api.http:
            return _dispatch(api, args)
    except (UsageError, SpecFileError) as error:
        print(f"trainjob: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as error:
        print(f"trainjob: {error.type}: {error.message}", file=sys.stderr)
        for item in error.fields:
            print(f"  {item.get('path') or 'body'}: {item.get('message')}", file=sys.stderr)
        return EXIT_FAILED
    except httpx.TransportError as error:
        print(f"trainjob: {api.unreachable(error)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Unreachable as error:
        print(f"trainjob: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("trainjob: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(api: Api, args: argparse.Namespace) -> int:
    as_json: bool = args.as_json
    if args.command == "submit":
        return submit(api, args.spec, watch_after=args.watch, as_json=as_json)
    if args.command == "status":
        return status(api, args.job_id, as_json=as_json)
    if args.command == "list":
        return list_jobs(
            api, status=args.status, limit=args.limit, after=args.after, as_json=as_json
        )
    if args.command == "watch":
        return watch(api, args.job_id, as_json=as_json)
    if args.command == "cancel":
        return cancel(api, args.job_id, as_json=as_json)
    if args.command == "events":
        return events(api, args.job_id, after=args.after, as_json=as_json)
    if args.command == "download":
        return download(api, args.job_id, out=args.output, step=args.step, as_json=as_json)
    if args.command == "files":
        from cli.files import files_command  # it builds on this module

        return files_command(api, args)
    raise AssertionError(f"unhandled command {args.command}")
