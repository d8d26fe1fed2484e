"""How the command-line client shows jobs to people: summaries, tables, a progress line.

Everything here turns the server's JSON into text; `--json` output bypasses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from cli.progress import LineSchedule, format_duration

Json = Mapping[str, Any]


def format_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


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
    rows = [
        ("status", job["status"] + (" (cancel requested)" if _cancel_pending(job) else "")),
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


def _cancel_pending(job: Json) -> bool:
    return bool(job.get("cancel_requested")) and job["status"] in {"running", "queued"}


def job_table(jobs: Sequence[Json]) -> str:
    """The `trainjob list` table: one row per job, columns padded to their widest cell."""
    header = ("ID", "STATUS", "STEP", "LOSS", "BATCH", "CREATED", "NAME")
    rows = [
        (
            job["id"],
            job["status"],
            format_steps(job["progress"]),
            format_loss((job.get("metrics") or {}).get("loss")),
            f"{job['batch_size']}={job['micro_batch_size']}×{job['accumulation_steps']}",
            str(job.get("created_at") or "")[:19].replace("T", " "),
            job.get("name") or "",
        )
        for job in jobs
    ]
    return table(header, rows)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows under a header, each column padded to its widest cell."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


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


class ProgressLine:
    """A live progress line: redrawn in place on a terminal, else a line now and then
    (about every 5 % of the steps, and at least every few seconds: LineSchedule).

    The ETA comes from the server's samples/s and the batch size, not from our own clock,
    so that events replayed after a reconnect do not make it jump.
    """

    def __init__(
        self,
        *,
        max_steps: int | None,
        batch_size: int,
        stream: TextIO,
        interactive: bool,
        width: int = 24,
        lines: LineSchedule | None = None,
    ) -> None:
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.stream = stream
        self.interactive = interactive
        self.width = width
        self.lines = lines or LineSchedule(max_steps)
        self._drawn = ""

    def update(self, step: int, loss: float, samples_per_sec: float) -> None:
        line = self._render(step, loss, samples_per_sec)
        if self.interactive:
            self._drawn = line
            self.stream.write("\r" + line + "\033[K")
            self.stream.flush()
        elif self.lines.due(step):
            self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, printed above the progress line."""
        if self.interactive and self._drawn:
            self.stream.write("\r\033[K" + text + "\n" + self._drawn)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = ""

    def _render(self, step: int, loss: float, samples_per_sec: float) -> str:
        rate = f"{samples_per_sec:,.0f} samples/s"
        if not self.max_steps:
            return f"step {step} loss {format_loss(loss)}  {rate}"
        filled = min(self.width, int(self.width * step / self.max_steps))
        bar = ("=" * filled + (">" if filled < self.width else "")).ljust(self.width)
        remaining = max(0, self.max_steps - step) * self.batch_size
        eta = format_duration(remaining / samples_per_sec) if samples_per_sec > 0 else "?"
        return (
            f"step {step}/{self.max_steps} [{bar[: self.width]}] loss {format_loss(loss)}  "
            f"{rate}  ETA {eta}"
        )
