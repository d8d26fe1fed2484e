"""The CUDA-only options on a machine without CUDA: quantize and adamw8bit are refused
with invalid_spec before any data is read, and what can be checked without bitsandbytes
is: the transformers config of each quantization, the arguments a quantized load passes,
and the base it leaves frozen for adapters. Their training runs in the CUDA lane
(tests/cuda/test_bitsandbytes.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from app.jobs.spec import HfCausalLmSpec
from worker.engine import trainer
from worker.engine.errors import TrainingError
from worker.engine.hf import build_hf_causal_lm
from worker.engine.precision import plan_precision
from worker.engine.quantize import (
    Quantization,
    check_cuda_options,
    plan_quantization,
    prepare_quantized,
    quantization_config,
)

from .conftest import make_spec
from .test_hf import TEXT_INFO, allowing, save_tiny_gpt2

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY_TEXT = {"type": "tiny-text", "min_length": 2, "max_length": 33}


def pretrained_spec(**overrides: Any) -> Any:
    # A quantized base trains adapters only: the spec refuses quantize without lora.
    adapters = {"lora": {"r": 8, "alpha": 16}} if "quantize" in overrides else {}
    return make_spec(
        model={"type": "hf-causal-lm", "pretrained": "/models/llama"},
        dataset=TINY_TEXT,
        device="auto",
        **adapters,
        **overrides,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "nf4"}, "quantize 'nf4' needs a CUDA device; this worker trains on cpu"),
        (
            {"optimizer": {"type": "adamw8bit"}},
            "optimizer.type 'adamw8bit' needs a CUDA device; this worker trains on cpu",
        ),
        (
            {"quantize": "int8", "optimizer": {"type": "adamw8bit"}},
            "quantize 'int8' and optimizer.type 'adamw8bit' need a CUDA device; this worker "
            "trains on cpu",
        ),
    ],
)
def test_the_cuda_only_options_are_refused_on_the_cpu(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(TrainingError) as refused:
        check_cuda_options(pretrained_spec(**options), CPU)
    assert (refused.value.type, refused.value.message) == ("invalid_spec", message)


def test_a_spec_without_them_runs_anywhere() -> None:
    check_cuda_options(pretrained_spec(), CPU)
    check_cuda_options(pretrained_spec(), CUDA)  # asks nothing of bitsandbytes


def test_a_cuda_worker_without_bitsandbytes_says_to_install_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as when absent
    with pytest.raises(TrainingError) as refused:
        check_cuda_options(pretrained_spec(optimizer={"type": "adamw8bit"}), CUDA)
    assert refused.value.type == "invalid_spec"
    assert refused.value.message.startswith("optimizer.type 'adamw8bit' needs bitsandbytes")
    assert "install trainjob[cuda] on the worker" in refused.value.message


def test_a_run_refuses_them_before_it_reads_any_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*_: Any) -> None:
        raise AssertionError("the data set was built before the device was checked")

    monkeypatch.setattr(trainer, "build_dataset", no_data)
    with pytest.raises(TrainingError) as refused:
        trainer.train(make_spec(model={"type": "tiny-gpt"}, dataset=TINY_TEXT, device="auto",
                                optimizer={"type": "adamw8bit"}))  # fmt: skip
    assert refused.value.type == "invalid_spec" and "needs a CUDA device" in refused.value.message


@pytest.mark.parametrize(
    ("precision", "compute_dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_nf4_computes_in_the_job_s_precision(precision: str, compute_dtype: torch.dtype) -> None:
    spec = pretrained_spec(quantize="nf4", precision=precision)
    quantization = plan_quantization(spec, plan_precision(spec.precision, CUDA))
    assert quantization == Quantization("nf4", CUDA, compute_dtype, torch.float32)
    config = quantization_config(quantization)
    assert (config.load_in_4bit, config.load_in_8bit) == (True, False)
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == compute_dtype


def test_int8_loads_8_bit_and_no_quantize_plans_nothing() -> None:
    spec = pretrained_spec(quantize="int8")
    quantization = plan_quantization(spec, plan_precision(spec.precision, CUDA))
    assert quantization is not None
    config = quantization_config(quantization)
    assert (config.load_in_4bit, config.load_in_8bit) == (False, True)
    assert plan_quantization(pretrained_spec(), plan_precision("fp32", CUDA)) is None


def test_a_quantized_base_is_loaded_whole_onto_the_run_s_device() -> None:
    arguments = Quantization("nf4", torch.device("cuda:1"), torch.float32, torch.float32)
    loading = arguments.from_pretrained_arguments()
    assert loading["device_map"] == {"": 1}  # never spread over devices or the CPU
    assert loading["dtype"] == torch.float32
    assert loading["quantization_config"].load_in_4bit


@dataclass(frozen=True)
class _Unquantized(Quantization):
    """The load path of a quantized base with what this machine can run: no bitsandbytes,
    so from_pretrained gets no quantization_config, only the rest."""

    def from_pretrained_arguments(self) -> dict[str, Any]:
        return {"dtype": self.parameter_dtype}


def test_a_quantized_load_passes_its_arguments_and_leaves_the_base_frozen(
    tmp_path: Path,
) -> None:
    save_tiny_gpt2(tmp_path / "gpt2")
    spec = HfCausalLmSpec(pretrained=str(tmp_path / "gpt2"))
    quantization = _Unquantized("nf4", CPU, torch.float64, torch.float64)
    model = build_hf_causal_lm(spec, TEXT_INFO, allowing(tmp_path), quantization)
    parameters = list(model.parameters())
    assert parameters and all(p.dtype == torch.float64 for p in parameters)
    # Only adapters added afterwards train (prepare_quantized froze every weight).
    assert not any(p.requires_grad for p in parameters)


def test_preparing_a_base_turns_no_activation_checkpointing_on(tmp_path: Path) -> None:
    """activation_checkpointing is an option of its own; peft's default would turn it on
    for a model loaded 4-bit, which this one says it is."""
    model = save_tiny_gpt2(tmp_path / "gpt2")
    model.is_loaded_in_4bit = True
    prepared = prepare_quantized(model)
    assert not any(
        getattr(module, "gradient_checkpointing", False) for module in prepared.modules()
    )
    assert not any(p.requires_grad for p in prepared.parameters())
