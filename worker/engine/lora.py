"""LoRA adapters through peft: the spec's `lora` put on a built model.

The model's own weights are frozen and peft adds a low-rank update beside each targeted
layer; only those (and a classifier's head) train. A transformers model is adapted
inside its wrapper (worker/engine/hf.py) with peft's task type, so that the adapter's
tensors are named exactly as peft names them for that model and the saved adapter loads
with `peft.PeftModel.from_pretrained` on the base model. The adapter's weights are drawn
from the global RNG, seeded before the model is built: a run rebuilds the same ones.

What a LoRA job saves:
- its checkpoint weights are the adapter's tensors alone (`adapter_tensors`, named as
  `peft.get_peft_model_state_dict` names them), with peft's adapter config in the
  safetensors metadata under ADAPTER_CONFIG_KEY;
- its final checkpoint also has the merged weights (`merged_weights`): the base model
  with each update added in, named as a job without LoRA names its weights.

peft is imported only when a job asks for LoRA: it comes with `trainjob[hf]`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.jobs.spec import (
    HfCausalLmSpec,
    HfSequenceClassificationSpec,
    LoraSpec,
    ModelSpec,
    TinyGptSpec,
)
from worker.engine.errors import TrainingError
from worker.engine.hf import CausalLm, SequenceClassifier, tied_aliases

if TYPE_CHECKING:
    from peft import PeftModel

# The safetensors metadata key of a LoRA checkpoint's adapter config (JSON).
ADAPTER_CONFIG_KEY = "peft_adapter_config"
# Where tiny-gpt's adapters go when the spec names none: its attention's linear layers.
TINY_GPT_TARGETS = ("qkv", "proj")
# peft's name for the one adapter a job trains; saved files leave it out.
ADAPTER = "default"


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise TrainingError(
            "invalid_spec",
            "LoRA adapters need the peft library: install trainjob[hf] on the worker",
        ) from error
    return peft


def apply_lora(model: nn.Module, spec: LoraSpec, model_spec: ModelSpec) -> nn.Module:
    """`model` with LoRA adapters on its targeted layers and every other weight frozen;
    the module to train. A transformers model stays in its wrapper."""
    peft = _import_peft()
    targets = spec.target_modules
    if isinstance(model_spec, TinyGptSpec):
        task_type = None
        targets = targets or list(TINY_GPT_TARGETS)
    elif isinstance(model_spec, HfCausalLmSpec) and isinstance(model, CausalLm):
        task_type = peft.TaskType.CAUSAL_LM
    elif isinstance(model_spec, HfSequenceClassificationSpec) and isinstance(
        model, SequenceClassifier
    ):
        # peft trains the classifier head too (modules_to_save): a new head must learn.
        task_type = peft.TaskType.SEQ_CLS
    else:
        raise TrainingError("invalid_spec", f"lora: not available for model {model_spec.type!r}")
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    inner = model.model if isinstance(model, CausalLm | SequenceClassifier) else model
    try:
        adapted = peft.get_peft_model(inner, config)
    except ValueError as error:  # no such target module, or none known for the model
        message = " ".join(str(error).split())[:600]
        raise TrainingError("invalid_spec", f"lora.target_modules: {message}") from error
    # What the saved adapter says it adapts: the spec's `pretrained` as the user named it
    # (peft would take the resolved directory, or "" for a `config` model).
    adapted.peft_config[ADAPTER].base_model_name_or_path = getattr(model_spec, "pretrained", None)
    if isinstance(model, CausalLm | SequenceClassifier):
        model.model = adapted
        return model
    return adapted


def peft_model(model: nn.Module) -> PeftModel | None:
    """The peft model inside the engine's model; None for a job without LoRA."""
    peft = _peft_if_imported()
    if peft is None:
        return None
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, peft.PeftModel):
            return candidate
    return None


def _peft_if_imported() -> Any:
    # A job without LoRA never imports peft (it takes a second): if it is not imported,
    # no model is a peft model.
    return sys.modules.get("peft")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer steps: all of a model's parameters, or a LoRA job's adapters
    (and head); the frozen weights get neither gradients nor optimizer state."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors by peft's saved names (the live tensors, no copies)."""
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model, adapter_name=ADAPTER))


def adapter_config(model: PeftModel) -> dict[str, Any]:
    """peft's adapter config, as `save_pretrained` writes adapter_config.json."""
    config = model.peft_config[ADAPTER].to_dict()
    # JSON has no sets: peft writes them as lists (sorted here, so the bytes are stable).
    return json.loads(json.dumps(config, default=_json_value))


def _json_value(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def adapter_metadata(model: PeftModel) -> dict[str, str]:
    """The safetensors metadata of a LoRA checkpoint's weights."""
    return {ADAPTER_CONFIG_KEY: json.dumps(adapter_config(model), sort_keys=True)}


def load_adapter(model: PeftModel, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's adapter tensors into `model`; refuse any other set of names."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_tensors(model))
    if set(tensors) != expected:
        raise TrainingError(
            "incompatible_checkpoint",
            "the checkpoint's adapter tensors are not this job's: "
            f"{len(set(tensors) - expected)} unknown, {len(expected - set(tensors))} missing",
        )
    set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)


@dataclass(frozen=True)
class MergedWeights:
    """The base model's weights with the adapters added in, computed a tensor at a time as
    they are written: `tensors` are the base's (for the safetensors header: a merged weight
    has its base weight's shape and dtype), and `merged` makes a merged one by its name."""

    tensors: dict[str, torch.Tensor]
    merged: dict[str, Callable[[], torch.Tensor]]

    def materialize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        make = self.merged.get(name)
        return tensor if make is None else make()


def merged_weights(model: PeftModel) -> MergedWeights:
    """What `merge_and_unload` would leave, by the names a job without LoRA saves (a
    transformers model's own, tied weights once; tiny-gpt's own), without changing the
    model or copying more than one weight at a time."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    wrappers = {name for name, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    def plain_name(key: str) -> tuple[str | None, LoraLayer | None]:
        """The key's name without peft's modules; None for the adapter's own tensors."""
        parts = key.split(".")
        for cut in range(1, len(parts)):
            owner, rest = ".".join(parts[:cut]), parts[cut:]
            if owner in lora_layers:
                if rest[0] != "base_layer":
                    return None, None
                layer = lora_layers[owner] if rest[1:] == ["weight"] else None
                return ".".join([owner, *rest[1:]]), layer
            if owner in wrappers:
                if rest[:2] != ["modules_to_save", ADAPTER]:
                    return None, None  # the head as it was before training
                return ".".join([owner, *rest[2:]]), None
        return key, None

    aliases = {plain_name(alias)[0] for alias in tied_aliases(base)}
    tensors: dict[str, torch.Tensor] = {}
    merged: dict[str, Callable[[], torch.Tensor]] = {}
    for key, tensor in base.state_dict().items():
        name, layer = plain_name(key)
        if name is None or name in aliases:
            continue
        tensors[name] = tensor
        if layer is not None and (ADAPTER in layer.lora_A or ADAPTER in layer.lora_embedding_A):
            merged[name] = _merger(layer, tensor)
    return MergedWeights(tensors, merged)


def _merger(layer: Any, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    def merge() -> torch.Tensor:
        # peft's own merge: weight + delta, in the weight's dtype.
        with torch.no_grad():
            return weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)

    return merge
