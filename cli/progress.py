"""A one-line progress bar for `trainjob run`: step, loss, samples/s, ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Where nobody watches a terminal, a line at least this often while steps advance: 5 %
# of a long run can take hours, and a log that says nothing looks like a hang.
LINE_EVERY_SECONDS = 5.0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class LineSchedule:
    """When a progress display that cannot redraw (a log, a pipe) prints a line: about
    twenty times per run, at the last step, and whenever LINE_EVERY_SECONDS have passed
    since the last line. Ask it once per step."""

    def __init__(
        self,
        total_steps: int | None,
        *,
        seconds: float = LINE_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        # With no step count known, every tenth step.
        self.every_steps = max(1, total_steps // 20) if total_steps else 10
        self.seconds = seconds
        self.clock = clock
        self.last_line_at = clock()

    def due(self, step: int) -> bool:
        now = self.clock()
        if (
            step % self.every_steps == 0
            or step == self.total_steps
            or now - self.last_line_at >= self.seconds
        ):
            self.last_line_at = now
            return True
        return False


class ProgressBar:
    """Redraws in place on a terminal; elsewhere prints a line now and then (LineSchedule)."""

    def __init__(
        self,
        total_steps: int,
        stream: TextIO | None = None,
        width: int = 24,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.width = width
        self.interactive = self.stream.isatty()
        self.clock = clock
        self.started = clock()
        self.first_step: int | None = None
        self.lines = LineSchedule(total_steps, clock=clock)

    def update(self, step: int, loss: float, samples_per_sec: float) -> None:
        if self.first_step is None:
            # A resumed run starts mid-way: the ETA counts only steps done here.
            self.first_step, self.started = step - 1, self.clock()
        done_here = step - self.first_step
        elapsed = self.clock() - self.started
        eta = elapsed / done_here * (self.total_steps - step) if done_here else 0.0
        filled = int(self.width * step / self.total_steps)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
        line = (
            f"step {step}/{self.total_steps} [{bar[: self.width]}] loss {loss:.4f}  "
            f"{samples_per_sec:,.0f} samples/s  ETA {format_duration(eta)}"
        )
        if self.interactive:
            self.stream.write("\r" + line + "\033[K")
            self.stream.flush()
        elif self.lines.due(step):
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
