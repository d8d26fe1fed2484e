"""The progress of a training run: `trainjob run` shows it on stderr, `trainjob watch` and
`submit --watch` on stdout. Step, bar, loss, samples/s, ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.text import Text

# Where nobody watches a terminal, a line at least this often while steps advance: 5 %
# of a long run can take hours, and a log that says nothing looks like a hang.
LINE_EVERY_SECONDS = 5.0
# The plain line's bar, in characters.
BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


class LineSchedule:
    """When a progress display that cannot redraw (a log, a pipe) prints a line: about
    twenty times per run, at the last step, and whenever LINE_EVERY_SECONDS have passed
    since the last line. Ask it once per step."""

    def __init__(
        self,
        total_steps: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        # With no step count known, every tenth step.
        self.every_steps = max(1, total_steps // 20) if total_steps else 10
        self.clock = clock
        self.last_line_at = clock()

    def due(self, step: int) -> bool:
        now = self.clock()
        if (
            step % self.every_steps == 0
            or step == self.total_steps
            or now - self.last_line_at >= LINE_EVERY_SECONDS
        ):
            self.last_line_at = now
            return True
        return False


class TrainingProgress:
    """A rich progress bar on a terminal, with notes printed above it; elsewhere (a log, a
    pipe, CI) a plain line now and then (LineSchedule), never an escape code.

    The ETA comes from the step's samples/s and the batch size, not from our own clock,
    so that events replayed after a reconnect (or a resumed run) do not make it jump.
    """

    def __init__(
        self,
        *,
        total_steps: int | None,
        batch_size: int,
        file: TextIO,
        lines: LineSchedule | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.file = file
        self.lines = lines or LineSchedule(total_steps)
        # Whether to redraw is the file's own answer, whatever FORCE_COLOR says.
        console = Console(file=file, force_terminal=file.isatty(), highlight=False)
        self.bar: Progress | None = None
        if console.is_interactive:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}", markup=False),
                console=console,
            )
            self.task = self.bar.add_task("step", total=total_steps, stats="")
            self.bar.start()

    def update(self, step: int, loss: float, samples_per_sec: float) -> None:
        steps = f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"
        stats = f"loss {format_loss(loss)}  {samples_per_sec:,.0f} samples/s"
        if self.total_steps:
            remaining = max(0, self.total_steps - step) * self.batch_size
            eta = format_duration(remaining / samples_per_sec) if samples_per_sec > 0 else "?"
            stats += f"  ETA {eta}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=steps, stats=stats)
        elif self.lines.due(step):
            if self.total_steps:
                filled = min(BAR_WIDTH, BAR_WIDTH * step // self.total_steps)
                steps += f" [{('=' * filled + '>').ljust(BAR_WIDTH)[:BAR_WIDTH]}]"
            self.file.write(f"{steps} {stats}\n")
            self.file.flush()

    def note(self, text: str) -> None:
        """A line of its own, above the bar."""
        if self.bar is not None:
            self.bar.console.print(Text(text))
        else:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
