"""bench/memory.py's smoke run: children measure, the table prints, the plot is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def test_memory_smoke_run_prints_both_series_and_writes_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "memory.png"
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--smoke", "--out", str(plot)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    header = next(line for line in lines if line.startswith("k "))
    assert "(m,k)" in header and "(m·k,1)" in header
    assert [line.split()[0] for line in lines[lines.index(header) + 1 :][:2]] == ["1", "2"]
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_checkpointing_smoke_run_prints_activation_memory_on_and_off() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--checkpointing", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.splitlines()
    header = next(line for line in lines if line.startswith("checkpointing "))
    assert "activation MiB" in header and "window s" in header
    rows = lines[lines.index(header) + 1 :][:2]
    assert [row.split()[0] for row in rows] == ["off", "on"]
    assert all(float(row.split()[3]) >= 0 for row in rows)  # peak over the between-windows set
    assert any(line.startswith("activation memory on/off: ") for line in lines)


def test_the_8_bit_optimizer_reaches_the_child_which_needs_cuda_for_it() -> None:
    """`--optimizer adamw8bit` measures on CUDA only: on the CPU its child's spec is refused,
    and the run says why."""
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--smoke", "--k", "1",
         "--device", "cpu", "--optimizer", "adamw8bit"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert "8-bit AdamW" in finished.stdout
    assert "device: 'cpu' cannot run optimizer.type 'adamw8bit'" in finished.stderr


def test_the_search_doubles_then_bisects_to_within_an_eighth_and_stops_at_what_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench/memory.py's search, its children replaced by a card that fits 100 samples."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import memory

    tried: list[tuple[int, int]] = []

    def probe(args: object, micro_batch_size: int, accumulation_steps: int) -> memory.Probe:
        tried.append((micro_batch_size, accumulation_steps))
        if micro_batch_size > 100:
            return memory.Probe(micro_batch_size, accumulation_steps, False, None, "out of memory")
        peak = float(micro_batch_size)
        return memory.Probe(micro_batch_size, accumulation_steps, True, peak, None)

    monkeypatch.setattr(memory, "probe", probe)
    args = memory.parse_arguments(["--search", "--search-k", "8"])
    start = memory.Point(4, 1, 0, 0, 4 * 2**20, "cuda")
    found = memory.search_largest(args, start)
    # 4 is known; 8..128 doubling, then 96, 112, 104 bisecting (within 96 // 8 = 12).
    assert tried == [(8, 1), (16, 1), (32, 1), (64, 1), (128, 1), (96, 1), (112, 1), (104, 1),
                     (96, 8)]  # fmt: skip
    assert (found.largest, found.stopped_by) == (96, "out of memory")
    assert found.accumulated is not None and found.accumulated.global_batch == 768

    capped = memory.search_largest(memory.parse_arguments(["--search-max", "24"]), start)
    assert (capped.largest, capped.stopped_by) == (24, "--search-max 24")


def test_lora_smoke_counts_less_gradient_and_optimizer_state_than_full_fine_tuning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/memory.py --lora --smoke, its two children run in this process (a child is
    a second of work and several of importing torch)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import memory
    import torch

    def in_process(
        args: object, micro_batch_size: int, accumulation_steps: int, lora_child: str | None = None
    ) -> dict[str, object]:
        assert lora_child is not None and accumulation_steps == 1
        child = ["--child", "--lora-child", lora_child, "--size", "gpt-smoke", "--steps", "1"]
        child += ["--micro-batch-size", str(micro_batch_size)]
        threads = torch.get_num_threads()
        try:
            memory.lora_child(memory.parse_arguments(child))
        finally:
            torch.set_num_threads(threads)
        printed: dict[str, object] = json.loads(capsys.readouterr().out.splitlines()[-1])
        return printed

    monkeypatch.setattr(memory, "run_child", in_process)
    figures = tmp_path / "lora.json"
    assert memory.main(["--lora", "--smoke", "--json", str(figures)]) == 0
    assert "lora/full" in capsys.readouterr().out
    measured = json.loads(figures.read_text())
    full, lora = measured["full"], measured["lora"]
    # fp32 AdamW: a gradient and two moments (and a step counter) per trained value.
    assert full["gradient_bytes"] == 4 * full["trainable"] == 4 * full["parameters"]
    assert lora["gradient_bytes"] == 4 * lora["trainable"] < 4 * lora["parameters"]
    assert lora["optimizer_state_bytes"] >= 8 * lora["trainable"]
    assert measured["ratio"] == pytest.approx(
        (lora["gradient_bytes"] + lora["optimizer_state_bytes"])
        / (full["gradient_bytes"] + full["optimizer_state_bytes"])
    )
    assert measured["met"] == (measured["ratio"] <= 0.1)
