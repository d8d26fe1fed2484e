"""TRAINJOB_TEST_FAULTS: each injected out-of-memory error strikes where its name says,
through the engine's own handling of it."""

from __future__ import annotations

from typing import Any

import pytest

from app.jobs.spec import JobSpec
from worker.engine.errors import TrainingError
from worker.engine.trainer import Callbacks, train
from worker.faults import fault_hooks, parse_faults

SPEC = {
    "model": {"type": "mlp", "hidden_sizes": [8]},
    "dataset": {"type": "synthetic-classification", "n_samples": 160, "n_features": 4},
    "micro_batch_size": 8,
    "accumulation_steps": 1,
    "max_steps": 2,
    "eval_every": 2,
    "device": "cpu",
}


def events_of(faults: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    callbacks = Callbacks(on_event=lambda kind, data: events.append((kind, data)))
    train(JobSpec.model_validate(SPEC), callbacks, hooks=fault_hooks(faults))
    return [(kind, data) for kind, data in events if kind != "checkpoint"]


@pytest.mark.parametrize("fault", ["oom=2", "oom_backward=2"])
def test_oom_in_forward_or_backward_halves_the_micro_batch(fault: str) -> None:
    assert [(kind, data["new_micro_batch_size"]) for kind, data in events_of(fault)] == [
        ("oom_backoff", 4),
        ("oom_backoff", 2),
    ]


def test_oom_eval_halves_the_evaluation_batch() -> None:
    assert [
        (kind, data["new_evaluation_batch_size"]) for kind, data in events_of("oom_eval=2")
    ] == [
        ("warning", 4),
        ("warning", 2),
    ]


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("oom", "micro-batch of 1 sample"),
        ("oom_backward", "micro-batch of 1 sample"),
        ("oom_step", "optimizer state does not fit"),
        ("oom_eval", "evaluation ran out of memory"),
    ],
)
def test_oom_everywhere_fails_out_of_memory_saying_where(fault: str, words: str) -> None:
    with pytest.raises(TrainingError) as failure:
        events_of(fault)
    assert failure.value.type == "out_of_memory" and words in failure.value.message


def test_an_unknown_fault_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="oom_step"):
        parse_faults("oom_stpe")


@pytest.mark.parametrize(("rank", "backoffs"), [("1", 2), ("0", 0), (None, 0)])
def test_oom_rank_keeps_the_fault_to_one_rank(
    rank: str | None, backoffs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)  # a run on one device
    else:
        monkeypatch.setenv("RANK", rank)
    events = events_of("oom=2,oom_rank=1")
    assert [kind for kind, _ in events].count("oom_backoff") == backoffs
