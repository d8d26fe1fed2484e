"""How the command-line client shows jobs and files to people: summaries, tables, lines.

Everything here turns the server's JSON into text; `--json` output bypasses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from cli.progress import format_duration, format_loss

Json = Mapping[str, Any]
UNWRAPPED_WIDTH = 100_000


def format_steps(progress: Json) -> str:
    max_steps = progress.get("max_steps")
    return f"{progress.get('step', 0)}/{max_steps if max_steps is not None else '?'}"


def format_error(error: Json | None) -> str:
    if not error:
        return "-"
    return f"{error.get('type', 'error')}: {error.get('message', '')}"


def format_batch(job: Json) -> str:
    """Batch = m × k, the full window's split, and a note when the latest step's window
    was an epoch's short last one (fewer samples, so fewer micro-batches, same split)."""
    split = f"{job['batch_size']} = {job['micro_batch_size']} × {job['accumulation_steps']}"
    last = (job.get("progress") or {}).get("last_window_samples")
    if isinstance(last, int) and last < job["batch_size"]:
        split += f" (last window partial: {last} of {job['batch_size']} samples)"
    return split


def job_summary(job: Json) -> str:
    """The readable `trainjob status` answer."""
    metrics = job.get("metrics") or {}
    loss = format_loss(metrics.get("loss"))
    if metrics.get("eval_loss") is not None:
        loss += f" (eval {format_loss(metrics['eval_loss'])})"
    cancel_pending = job.get("cancel_requested") and job["status"] in {"running", "queued"}
    rows = [
        ("status", job["status"] + (" (cancel requested)" if cancel_pending else "")),
        ("priority", str(job.get("priority", "-"))),
        *optional_rows(job),
        ("step", format_steps(job["progress"])),
        ("loss", loss),
        ("batch", format_batch(job)),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
        ("worker", job.get("worker") or "-"),
        ("runtime", format_duration(job.get("runtime_seconds") or 0)),
        ("created", job.get("created_at") or "-"),
        ("error", format_error(job.get("error"))),
    ]
    title = job["id"] + (f"  {job['name']}" if job.get("name") else "")
    return "\n".join([title, *(f"  {label:<9} {value}" for label, value in rows)])


def optional_rows(job: Json) -> list[tuple[str, str]]:
    """The queue position of a queued job and the estimated finish of a running one, when
    the server knows them."""
    rows = []
    position = job.get("queue_position")
    if position is not None:
        rows.append(("queue", "next" if position == 0 else f"{position} jobs run before it"))
    finish = job.get("estimated_finish")
    if finish:
        rows.append(("eta", f"{format_time(finish)} UTC"))
    return rows


def print_job_table(jobs: Sequence[Json]) -> None:
    """The `trainjob list` table: one row per job."""
    rows = [
        (
            job["id"],
            job["status"],
            format_steps(job["progress"]),
            format_loss((job.get("metrics") or {}).get("loss")),
            f"{job['batch_size']}={job['micro_batch_size']}×{job['accumulation_steps']}",
            format_time(job.get("created_at")),
            job.get("name") or "",
        )
        for job in jobs
    ]
    print_table(("ID", "STATUS", "STEP", "LOSS", "BATCH", "CREATED", "NAME"), rows)


def format_time(timestamp: str | None) -> str:
    return str(timestamp or "")[:19].replace("T", " ")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Rows under a header, each column as wide as its widest cell."""
    table = Table(*header, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    # No markup or emoji codes: a job's name is printed as it is. Never fitted to the
    # terminal (rich would cut ids short) nor wrapped: `grep` and `awk` read whole lines.
    console = Console(markup=False, emoji=False, highlight=False, width=UNWRAPPED_WIDTH)
    with console.capture() as captured:
        console.print(table)
    # Written by us: rich pads the last column with spaces, and would answer a closed pipe
    # with exit 1 where main() exits 141 quietly.
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def event_line(event: Json) -> str:
    """One stored event (`GET /v1/jobs/{id}/events`) as a line of `trainjob events`."""
    data = json.dumps(event.get("data") or {}, separators=(",", ":"), sort_keys=True)
    return f"{event['id']:>6}  {event.get('created_at', '')}  {event['type']:<13} {data}"


def live_event_note(event_type: str, data: Json) -> str | None:
    """A line worth showing above the progress bar while watching, or None to stay quiet."""
    if event_type == "status":
        note = f"status: {data.get('status')}"
        if data.get("reason"):
            note += f" ({data['reason']})"
        return note
    if event_type == "checkpoint":
        return f"checkpoint at step {data.get('step')}"
    if event_type == "oom_backoff":
        return (
            f"out of memory at step {data.get('step')}: micro-batch "
            f"{data.get('old_micro_batch_size')} → {data.get('new_micro_batch_size')}"
        )
    if event_type in {"overflow_skip", "warning", "error"}:
        detail = data.get("message") or json.dumps(dict(data), separators=(",", ":"))
        return f"{event_type}: {detail}"
    return None


def final_line(job: Json) -> str:
    """What a watch ends with: status, final loss, steps, elapsed training time."""
    loss = format_loss((job.get("metrics") or {}).get("loss"))
    return (
        f"{job['id']} {job['status']}: step {format_steps(job['progress'])}, "
        f"final loss {loss}, elapsed {format_duration(job.get('runtime_seconds') or 0)}"
    )
