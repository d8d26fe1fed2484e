"""The progress display of `trainjob run`, `watch` and `submit --watch`. Off a terminal (a
log, a pipe): a plain line every 5 % of the steps, and at least every few seconds while
steps advance. Time comes from a fake clock."""

from __future__ import annotations

import io

import pytest

from cli.progress import LINE_EVERY_SECONDS, LineSchedule, TrainingProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def printed_steps(text: str) -> list[str]:
    return [line.split(" [")[0] for line in text.splitlines()]


def off_a_terminal(total_steps: int, clock: FakeClock) -> tuple[TrainingProgress, io.StringIO]:
    out = io.StringIO()  # not a terminal
    lines = LineSchedule(total_steps, clock=clock)
    return TrainingProgress(total_steps=total_steps, batch_size=32, file=out, lines=lines), out


def test_off_a_terminal_a_line_comes_at_least_every_five_seconds() -> None:
    clock = FakeClock()
    # 5 % of 1000 steps is 50 steps: at 10 s a step, that is a line every 8 minutes.
    progress, out = off_a_terminal(1000, clock)
    for step, seconds in [(1, 0.0), (2, 4.9), (3, 5.0), (4, 9.9), (5, 10.1), (50, 11.0)]:
        clock.now = 1000.0 + seconds
        progress.update(step, 1.0, 100.0)
    # Step 3: five seconds since the start; step 5: since step 3's line; step 50: 5 %.
    assert printed_steps(out.getvalue()) == ["step 3/1000", "step 5/1000", "step 50/1000"]
    assert LINE_EVERY_SECONDS == 5.0  # what README promises


def test_off_a_terminal_a_line_comes_every_5_percent_and_at_the_last_step() -> None:
    progress, out = off_a_terminal(40, FakeClock())  # the clock never advances
    for step in range(1, 41):
        progress.update(step, 1.0, 100.0)
    assert printed_steps(out.getvalue()) == [f"step {step}/40" for step in range(2, 41, 2)]


def test_the_plain_line_has_a_bar_and_an_eta_from_the_rate_and_the_batch_size() -> None:
    progress, out = off_a_terminal(100, FakeClock())
    progress.update(50, 1.25, 1000.0)
    progress.note("checkpoint at step 50")
    # 50 steps × 32 samples to go at 1,000 samples/s.
    assert out.getvalue().splitlines() == [
        "step 50/100 [============>           ] loss 1.2500  1,000 samples/s  ETA 0:00:01",
        "checkpoint at step 50",
    ]


def test_with_no_step_count_the_plain_line_has_no_bar_and_no_eta() -> None:
    out = io.StringIO()
    progress = TrainingProgress(total_steps=None, batch_size=8, file=out)
    progress.update(10, 0.5, 80.0)
    assert out.getvalue() == "step 10 loss 0.5000  80 samples/s\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_is_a_rich_bar_with_notes_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm")
    screen = Terminal()
    progress = TrainingProgress(total_steps=100, batch_size=32, file=screen)
    assert progress.bar is not None
    progress.update(50, 1.25, 1000.0)
    progress.note("checkpoint at step 50")
    progress.close()
    drawn = screen.getvalue()
    assert "\033[" in drawn  # redrawn in place, not a line per step
    assert "checkpoint at step 50" in drawn
    assert "step 50/100" in drawn and "loss 1.2500  1,000 samples/s  ETA 0:00:01" in drawn
