"""The optimizer a spec asks for, with the spec's values. bitsandbytes' AdamW8bit runs on
CUDA only (its training and checkpointed resume: tests/cuda/test_bitsandbytes.py); here a
stand-in module shows what it is built with."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from app.jobs.spec import OptimizerSpec
from worker.engine.errors import TrainingError
from worker.engine.optim import build_optimizer


class _RecordingAdamW8bit(torch.optim.AdamW):
    def __init__(self, parameters: Any, **options: Any) -> None:
        super().__init__(parameters, **options)
        self.built_with = options


def test_adamw8bit_is_bitsandbytes_adamw8bit_with_the_spec_s_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stand_in = ModuleType("bitsandbytes")
    stand_in.optim = SimpleNamespace(AdamW8bit=_RecordingAdamW8bit)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bitsandbytes", stand_in)
    spec = OptimizerSpec(type="adamw8bit", lr=0.002, betas=(0.8, 0.95), weight_decay=0.1)
    optimizer = build_optimizer(spec, [torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(optimizer, _RecordingAdamW8bit)
    # weight_decay given even at 0: bitsandbytes' own default is 0.01, the spec's 0.
    assert optimizer.built_with == {
        "lr": 0.002, "betas": (0.8, 0.95), "weight_decay": 0.1
    }  # fmt: skip


def test_adamw8bit_without_bitsandbytes_is_an_invalid_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(TrainingError) as refused:
        build_optimizer(OptimizerSpec(type="adamw8bit"), [torch.nn.Parameter(torch.zeros(3))])
    assert refused.value.type == "invalid_spec" and "trainjob[cuda]" in refused.value.message


@pytest.mark.parametrize(
    ("type_", "optimizer_class"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)]
)
def test_sgd_and_adamw_are_torch_s(type_: str, optimizer_class: type) -> None:
    spec = OptimizerSpec(type=type_, lr=0.01, weight_decay=0.1)  # type: ignore[arg-type]
    optimizer = build_optimizer(spec, [torch.nn.Parameter(torch.zeros(3))])
    assert type(optimizer) is optimizer_class
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.1
