"""Checkpoints remember the last evaluation: at or before their step, the same step's
evaluation first, and across a resume from a checkpoint written to a directory. Their
weights stream out as safetensors' own bytes, and only while the run waits for them.
Random states round-trip, CUDA's only where the run used it and on the devices there are."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from worker.engine.checkpoint import (
    STATE_FORMAT,
    Checkpoint,
    LiveCheckpoint,
    capture_rng,
    restore_rng,
    unpack_state,
    write_safetensors,
)
from worker.engine.trainer import Callbacks, StepMetrics, train

from .conftest import make_spec


def last_eval_at_or_before(steps: list[StepMetrics], step: int) -> float | None:
    evaluated = [m.eval_loss for m in steps if m.eval_loss is not None and m.step <= step]
    return evaluated[-1] if evaluated else None


def test_a_checkpoint_remembers_the_last_evaluation_at_or_before_its_step() -> None:
    steps: list[StepMetrics] = []
    saved: list[LiveCheckpoint] = []
    spec = make_spec(max_steps=9, eval_every=3, checkpoint_every=2)
    train(spec, Callbacks(on_step=steps.append, on_checkpoint=saved.append))
    assert [m.step for m in steps if m.eval_loss is not None] == [3, 6, 9]
    assert [c.step for c in saved] == [2, 4, 6, 8, 9]
    # At steps 6 and 9 both are due: the evaluation runs first, the checkpoint has it.
    assert [c.eval_loss for c in saved] == [last_eval_at_or_before(steps, c.step) for c in saved]
    assert saved[0].eval_loss is None and saved[2].eval_loss == steps[5].eval_loss


def test_without_a_held_out_split_checkpoints_have_no_eval_loss() -> None:
    saved: list[LiveCheckpoint] = []
    dataset = {"type": "synthetic-classification", "n_samples": 96, "n_features": 6}
    spec = make_spec(max_steps=4, eval_every=1, checkpoint_every=2,
                     dataset={**dataset, "eval_fraction": 0.0})  # fmt: skip
    train(spec, Callbacks(on_checkpoint=saved.append))
    assert [(c.step, c.eval_loss) for c in saved] == [(2, None), (4, None)]


def test_a_resumed_run_s_checkpoints_still_know_the_last_eval_loss(tmp_path: Path) -> None:
    spec = make_spec(max_steps=10, eval_every=4, checkpoint_every=1)
    steps: list[StepMetrics] = []
    uninterrupted: list[LiveCheckpoint] = []
    whole = train(spec, Callbacks(on_step=steps.append, on_checkpoint=uninterrupted.append))

    # Stops after step 4's evaluation; its checkpoint goes to disk and back.
    stopped: list[LiveCheckpoint] = []

    def on_checkpoint(saved: LiveCheckpoint) -> None:
        stopped.append(saved)
        saved.write(tmp_path / f"step-{saved.step}")  # its parts: only while it is handed out

    train(
        spec,
        Callbacks(
            on_checkpoint=on_checkpoint,
            should_stop=lambda: "stopped" if stopped and stopped[-1].step == 4 else None,
        ),
    )
    read = Checkpoint.read(tmp_path / "step-4")
    assert steps[3].eval_loss is not None and read.eval_loss == steps[3].eval_loss
    # The job runner builds its resume checkpoint from bytes alone: the state carries it.
    bare = Checkpoint(step=read.step, weights=read.weights, state=read.state)
    resumed: list[LiveCheckpoint] = []
    rest = train(spec, Callbacks(on_checkpoint=resumed.append), resume=bare)

    assert [c.step for c in resumed] == [5, 6, 7, 8, 9, 10]
    assert [(c.step, c.eval_loss) for c in resumed] == [
        (c.step, c.eval_loss) for c in uninterrupted[4:]
    ]
    assert resumed[0].eval_loss == steps[3].eval_loss  # step 5: no evaluation of its own
    assert rest.weights == whole.weights  # remembering it changes nothing trained


def test_streamed_weights_are_the_bytes_safetensors_makes() -> None:
    tensors = {
        "layer.weight": torch.randn(3, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 2),
        "half": torch.randn(7, dtype=torch.float16),
        "brain": torch.randn(5, dtype=torch.bfloat16),
        "count": torch.arange(4),
        "mask": torch.tensor([True, False]),
        "bytes": torch.arange(3, dtype=torch.uint8),
        "columns": torch.randn(4, 3).t(),  # not contiguous
    }
    for metadata in (None, {"step": "7"}):
        sink = io.BytesIO()
        size = write_safetensors(tensors, metadata, sink)
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        assert sink.getvalue() == save_safetensors(contiguous, metadata=metadata)
        assert size == len(sink.getvalue())


def test_a_checkpoint_s_parts_can_be_written_only_while_it_is_handed_out(
    tmp_path: Path,
) -> None:
    saved: list[LiveCheckpoint] = []
    train(make_spec(max_steps=2, checkpoint_every=1), Callbacks(on_checkpoint=saved.append))
    with pytest.raises(RuntimeError, match="during on_checkpoint only"):
        saved[0].write(tmp_path / "late")  # the run trained on: these would be step 2's


def round_trip_rng(state: dict[str, Any]) -> dict[str, Any]:
    """`state` as a resumed run reads it: saved and loaded weights-only, as in a checkpoint."""
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "rng": state}, buffer)
    rng: dict[str, Any] = unpack_state(buffer.getvalue())["rng"]
    return rng


def test_a_run_that_never_used_cuda_saves_no_cuda_rng_and_restores_every_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Asking for CUDA's states would start CUDA in a CPU job's process (on a GPU machine).
    def refuse() -> list[torch.Tensor]:
        raise AssertionError("asked CUDA for its random states")

    # As on a GPU machine whose job runs on the CPU: CUDA there, never started.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    saved = round_trip_rng(capture_rng())
    assert saved["cuda"] == []
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(6)
    random.seed(6)
    np.random.seed(6)
    restore_rng(saved)
    drawn = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]


def test_cuda_rng_is_restored_only_on_the_devices_this_process_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rank 0 of a group on two GPUs saw both; the run resumes on one GPU. Setting the
    # second device's state (as set_rng_state_all does) fails where it is not there.
    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    saved = round_trip_rng(capture_rng())
    assert [state.tolist() for state in saved["cuda"]] == [state.tolist() for state in states]
    restored: list[tuple[list[int], int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, index: restored.append((state.tolist(), index))
    )
    restore_rng(saved)
    assert restored == [(states[0].tolist(), 0)]
