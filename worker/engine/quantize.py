"""The bitsandbytes options, CUDA only: an hf-* model's base loaded 4-bit or 8-bit
(`quantize`, as QLoRA does) and AdamW with 8-bit state (`optimizer.type` "adamw8bit",
built in worker/engine/optim.py).

bitsandbytes' kernels are CUDA's. A run refuses both options on any other device, and on
a CUDA worker without bitsandbytes (the optional `trainjob[cuda]` extra), as soon as its
device is known: before any data is read or a model is built (`check_cuda_options`).
bitsandbytes, transformers' BitsAndBytesConfig and peft are imported only when a job asks
for them.

A quantized base is frozen: its 4/8-bit weights never change; adapters (LoRA) on top of
them are what trains. It is loaded straight onto the run's CUDA device (`device_map`) and
must not be moved or cast afterwards: transformers refuses `.to(dtype)` on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from app.jobs.spec import JobSpec, Quantize, cuda_only_options
from worker.engine.errors import TrainingError
from worker.engine.precision import PrecisionPlan


def check_cuda_options(spec: JobSpec, device: torch.device) -> None:
    """Refuse quantize and adamw8bit where bitsandbytes cannot run them: off CUDA, or
    without bitsandbytes installed. Cheap: nothing is loaded or built yet."""
    asked = cuda_only_options(spec)
    if not asked:
        return
    needs = " and ".join(asked) + (" need" if len(asked) > 1 else " needs")
    if device.type != "cuda":
        raise TrainingError(
            "invalid_spec", f"{needs} a CUDA device; this worker trains on {device.type}"
        )
    import_bitsandbytes(needs)


def import_bitsandbytes(needs: str) -> ModuleType:
    """bitsandbytes, or invalid_spec saying what `needs` it and how to install it."""
    try:
        import bitsandbytes
    # Not only ImportError: a bitsandbytes that finds no usable CUDA library can fail
    # otherwise, and that too is this worker's setup, not the job's internal error.
    except Exception as error:
        raise TrainingError(
            "invalid_spec",
            f"{needs} bitsandbytes, which this worker cannot import ({error}): install "
            "trainjob[cuda] on the worker",
        ) from error
    return bitsandbytes


@dataclass(frozen=True)
class Quantization:
    """How an hf-* model's base is loaded: `kind` on `device`, its matrix products computed
    in `compute_dtype`, the parameters it leaves unquantized (embeddings, norms, the
    output layer or classifier head) in `parameter_dtype`."""

    kind: Quantize
    device: torch.device
    compute_dtype: torch.dtype
    parameter_dtype: torch.dtype

    def from_pretrained_arguments(self) -> dict[str, Any]:
        """What `from_pretrained` takes to load the base quantized onto the run's device."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return {
            "quantization_config": quantization_config(self),
            # The whole model on the run's one device: never spread or offloaded to the CPU.
            "device_map": {"": index},
            "dtype": self.parameter_dtype,
        }


def plan_quantization(spec: JobSpec, precision: PrecisionPlan) -> Quantization | None:
    """The spec's quantization on the run's device and precision; None without one. The
    base computes in the precision's autocast dtype (bf16, fp16), else in fp32."""
    if spec.quantize is None:
        return None
    compute_dtype = precision.autocast_dtype or precision.parameter_dtype
    return Quantization(spec.quantize, precision.device, compute_dtype, precision.parameter_dtype)


def quantization_config(quantization: Quantization) -> Any:
    """transformers' BitsAndBytesConfig: NF4 with double quantization (the QLoRA paper's
    4-bit base; the quantization constants are quantized too, about 0.37 bit per weight
    less), or LLM.int8(). transformers keeps the output layer (and a classifier's head,
    the model's last module) unquantized by default."""
    try:
        import transformers
    except ImportError as error:
        raise TrainingError(
            "invalid_spec", "quantize needs the transformers library: install trainjob[hf]"
        ) from error
    if quantization.kind == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=quantization.compute_dtype,
        )
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def prepare_quantized(model: Any) -> Any:
    """A quantized transformers model made ready for adapters, by peft's own
    prepare_model_for_kbit_training: every weight frozen, the few it keeps in 16 bits
    upcast to fp32. Activation checkpointing is an option of its own: not turned on here."""
    try:
        import peft
    except ImportError as error:
        raise TrainingError(
            "invalid_spec", "quantize needs the peft library: install trainjob[hf]"
        ) from error
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
