"""Progress displays off a terminal (a log, a pipe): a line every 5 % of the steps, and
at least every few seconds while steps advance. Time comes from a fake clock."""

from __future__ import annotations

import io

from cli.output import ProgressLine
from cli.progress import LINE_EVERY_SECONDS, LineSchedule, ProgressBar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def printed_steps(text: str) -> list[str]:
    return [line.split(" [")[0] for line in text.splitlines()]


def test_watch_off_a_terminal_prints_a_line_at_least_every_five_seconds() -> None:
    clock = FakeClock()
    out = io.StringIO()
    # 5 % of 1000 steps is 50 steps: at 10 s a step, that is a line every 8 minutes.
    progress = ProgressLine(
        max_steps=1000,
        batch_size=32,
        stream=out,
        interactive=False,
        lines=LineSchedule(1000, clock=clock),
    )
    for step, seconds in [(1, 0.0), (2, 4.9), (3, 5.0), (4, 9.9), (5, 10.1), (50, 11.0)]:
        clock.now = 1000.0 + seconds
        progress.update(step, 1.0, 100.0)
    # Step 3: five seconds since the start; step 5: since step 3's line; step 50: 5 %.
    assert printed_steps(out.getvalue()) == ["step 3/1000", "step 5/1000", "step 50/1000"]
    assert LINE_EVERY_SECONDS == 5.0  # what README promises


def test_watch_off_a_terminal_still_prints_every_5_percent_and_the_last_step() -> None:
    clock = FakeClock()  # never advances: only the step count decides
    out = io.StringIO()
    progress = ProgressLine(
        max_steps=40,
        batch_size=8,
        stream=out,
        interactive=False,
        lines=LineSchedule(40, clock=clock),
    )
    for step in range(1, 40):
        progress.update(step, 1.0, 100.0)
    progress.update(40, 1.0, 100.0)
    assert printed_steps(out.getvalue()) == [f"step {step}/40" for step in range(2, 41, 2)]


def test_run_off_a_terminal_prints_a_line_at_least_every_five_seconds() -> None:
    clock = FakeClock()
    out = io.StringIO()  # not a terminal
    bar = ProgressBar(1000, stream=out, clock=clock)
    for step, seconds in [(1, 1.0), (2, 3.0), (3, 6.5), (4, 8.0), (5, 12.0)]:
        clock.now = 1000.0 + seconds
        bar.update(step, 0.5, 200.0)
    assert printed_steps(out.getvalue()) == ["step 3/1000", "step 5/1000"]
    # The ETA is from the same clock: 5 steps in the 11 s since step 1 began, 995 to go.
    assert out.getvalue().splitlines()[-1].endswith("ETA 0:36:29")
