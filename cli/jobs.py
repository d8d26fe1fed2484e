"""`trainjob submit|status|list|watch|cancel|pause|resume|events|download`: jobs, through
the HTTP API (cli/client.py). `watch` follows the job's event stream and reconnects where
it drops."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, connect_sse

from app.jobs.schemas import TERMINAL_STATUSES
from cli import output
from cli.client import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Api,
    ApiError,
    Unreachable,
    list_page,
    print_json,
    show,
)
from cli.progress import TrainingProgress
from cli.specfile import read_spec

# A stream that drops is reopened this many times in a row before we give up; any
# event received resets the count.
RECONNECT_ATTEMPTS = 6
RECONNECT_MAX_DELAY_SECONDS = 10.0
# The server sends keep-alive comments far more often than this; silence this long
# means the connection is gone even if no socket error says so.
STREAM_READ_TIMEOUT_SECONDS = 60.0


def job_path(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/jobs", quote(job_id, safe=""), *rest])


# --- commands: each takes the parsed arguments of its subcommand ---------------------


def submit(api: Api, args: argparse.Namespace) -> int:
    job = api.post("/v1/jobs", read_spec(args.spec))
    if args.watch:
        if not args.as_json:
            print(job["id"], flush=True)
        return watch_job(api, job["id"], as_json=args.as_json)
    show(job, job["id"], as_json=args.as_json)
    return EXIT_OK


def status(api: Api, args: argparse.Namespace) -> int:
    job = api.get(job_path(args.job_id))
    show(job, output.job_summary(job), as_json=args.as_json)
    return EXIT_OK


def cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.post(job_path(args.job_id, "cancel"))
    text = f"{job['id']} {job['status']}"
    if job["status"] == "cancelling":
        text += ": it stops at its next optimizer step"
    show(job, text, as_json=args.as_json)
    return EXIT_OK


def pause(api: Api, args: argparse.Namespace) -> int:
    job = api.post(job_path(args.job_id, "pause"))
    text = f"{job['id']} {job['status']}"
    if job["status"] == "pausing":
        text += ": it checkpoints at its next optimizer step and frees its device"
    show(job, text, as_json=args.as_json)
    return EXIT_OK


def resume(api: Api, args: argparse.Namespace) -> int:
    job = api.post(job_path(args.job_id, "resume"))
    text = f"{job['id']} {job['status']}"
    if job["status"] == "queued":
        text += ": it resumes from its latest checkpoint when a worker takes it"
    show(job, text, as_json=args.as_json)
    return EXIT_OK


def events(api: Api, args: argparse.Namespace) -> int:
    collected: list[dict[str, Any]] = []
    after = args.after
    while True:
        page = api.get(job_path(args.job_id, "events"), after=after, limit=100)
        collected += page["data"]
        if not args.as_json:
            for event in page["data"]:
                print(output.event_line(event))
        if not page["has_more"] or not page["data"]:
            break
        after = page["data"][-1]["id"]
    if args.as_json:
        # All pages as one document of the server's own shape.
        print_json({"data": collected, "has_more": False})
    return EXIT_OK


def download(api: Api, args: argparse.Namespace) -> int:
    step = args.step
    params: dict[str, str | int] = {"step": step} if step is not None else {}
    if args.format is not None:
        params["format"] = args.format
    if args.merged:
        params["merged"] = "true"
    with api.http.stream("GET", job_path(args.job_id, "weights"), params=params) as response:
        # What came is known from the response: a LoRA job's adapter is a zip by default.
        stem = f"{args.job_id}{f'-step{step}' if step is not None else ''}"
        if response.headers.get("content-type", "").startswith("application/zip"):
            default_name = f"{stem}-adapter.zip"
        elif args.merged:
            default_name = f"{stem}-merged.safetensors"
        else:
            default_name = f"{stem}.safetensors"
        target = args.output or Path(default_name)
        if target.is_dir():
            target = target / default_name
        size = _write_atomically(target, response.iter_bytes())
    at_step = response.headers.get("X-Checkpoint-Step")
    step_text = f", step {at_step}" if at_step else ""
    show(
        {"path": str(target), "size_bytes": size, "step": int(at_step) if at_step else None},
        f"{target} ({size:,} bytes{step_text})",
        as_json=args.as_json,
    )
    return EXIT_OK


COMMANDS = {
    "submit": submit,
    "status": status,
    "list": lambda api, args: list_page(api, args, "jobs", output.print_job_table),
    "watch": lambda api, args: watch_job(api, args.job_id, as_json=args.as_json),
    "cancel": cancel,
    "pause": pause,
    "resume": resume,
    "events": events,
    "download": download,
}


def _write_atomically(target: Path, chunks: Iterator[bytes]) -> int:
    """Write to a temporary file beside `target`, then rename: a dropped download never
    leaves a truncated file under the real name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
            size = file.tell()
        # mkstemp makes the file private; the weights are as readable as any file we write.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return size


# --- watch -------------------------------------------------------------------------


def watch_job(api: Api, job_id: str, *, as_json: bool) -> int:
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
    headers = {"Last-Event-ID": position.last_event_id} if position.last_event_id else {}
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
