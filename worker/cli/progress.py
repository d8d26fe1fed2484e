"""A one-line progress bar for `trainjob run`: step, loss, samples/s, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """Redraws in place on a terminal; elsewhere prints about twenty lines per run."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.width = width
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.every = max(1, total_steps // 20)

    def update(self, step: int, loss: float, samples_per_sec: float) -> None:
        if self.first_step is None:
            # A resumed run starts mid-way: the ETA counts only steps done here.
            self.first_step, self.started = step - 1, time.monotonic()
        done_here = step - self.first_step
        elapsed = time.monotonic() - self.started
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
        elif step % self.every == 0 or step == self.total_steps:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
