"""The job spec: what a user asks to train, validated before anything runs.

Pure pydantic: the API imports this module to validate submissions and must never
pull in torch. Every bound lives here so that no request can ask for a model, a
batch or a run that cannot possibly fit; every error names its field.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from functools import cache
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MODEL_ENTRY_POINT_GROUP = "trainjob.models"
DATASET_ENTRY_POINT_GROUP = "trainjob.datasets"

MAX_MICRO_BATCH_SIZE = 4096
MAX_ACCUMULATION_STEPS = 4096
MAX_BATCH_SIZE = 65536
MAX_DEVICES = 64
MAX_NODES = 16
MAX_STEPS = 1_000_000
MAX_PARAMETERS = 200_000_000
# One micro-batch's activations, counted in elements of the largest tensors the
# built-in models keep for backward. 2**32 fp32 elements is 16 GiB: beyond any
# single accelerator we run on once multiplied by the layers that store them.
MAX_ACTIVATION_ELEMENTS = 2**32
# The deepest a spec goes is model.hidden_sizes[0]; a plugin's own fields get room to spare.
MAX_NESTING = 32

# Defaults a new spec gets where it leaves a field out (docs: README's spec reference,
# docs/models.md, docs/files.md). A stored spec has every value spelled out, so changing
# one changes new submissions only.
DEFAULT_EVAL_FRACTION = 0.1  # held out of every data set that has no validation file
SGD_LR = 0.05
ADAMW_LR = 1e-3  # what nanoGPT trains its small models from scratch with
FINE_TUNING_LR = 5e-5  # transformers' Trainer default for pretrained weights
HF_MODELS = frozenset({"hf-causal-lm", "hf-sequence-classification"})
# Trained with AdamW unless the spec says otherwise; every other model with SGD.
ADAMW_MODELS = HF_MODELS | {"tiny-gpt"}
# The models that keep packed rows apart (dataset.packing): tiny-gpt by its own mask, and
# transformers causal LMs whose masks follow position ids (the worker checks each one).
PACKING_MODELS = frozenset({"tiny-gpt", "hf-causal-lm"})
# Models whose blocks the engine knows how to recompute in backward (docs/models.md,
# "Activation checkpointing"). The MLP and CNN have no blocks worth recomputing, and a
# plugin's model is opaque to the engine: a plugin checkpoints inside its own module,
# through parameters of its own.
ACTIVATION_CHECKPOINTING_MODELS = HF_MODELS | {"tiny-gpt"}


# In [0, 1): dropout, momentum and Adam's betas.
_Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _by_type(union: Any) -> dict[str, type[BaseModel]]:
    """Built-in spec classes by the name their `type` field defaults to."""
    return {spec_class.model_fields["type"].default: spec_class for spec_class in get_args(union)}


# ---------------------------------------------------------------- models


class MlpSpec(_Strict):
    type: Literal["mlp"] = "mlp"
    hidden_sizes: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        default_factory=lambda: [64], max_length=8
    )
    dropout: _Fraction = 0.0


class CnnSpec(_Strict):
    type: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(ge=1, le=512)]] = Field(
        default_factory=lambda: [16, 32], min_length=1, max_length=4
    )
    kernel_size: int = Field(3, ge=1, le=7)
    hidden_size: int = Field(64, ge=1, le=4096)
    dropout: _Fraction = 0.0


class TinyGptSpec(_Strict):
    type: Literal["tiny-gpt"] = "tiny-gpt"
    n_layer: int = Field(2, ge=1, le=24)
    n_head: int = Field(2, ge=1, le=32)
    n_embd: int = Field(64, ge=8, le=2048)
    block_size: int = Field(128, ge=2, le=2048)
    dropout: _Fraction = 0.0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyGptSpec:
        if self.n_embd % self.n_head:
            # Only ever nested as JobSpec.model: the error names its full path.
            raise _field_error(
                "model.n_embd", f"must be a multiple of n_head ({self.n_head}), not {self.n_embd}"
            )
        return self


class PluginModelSpec(BaseModel):
    """A model registered by a worker through the `trainjob.models` entry point group.

    Its parameters are the plugin's business; the worker validates them when it builds.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str


class _HfModelSpec(_Strict):
    """A Hugging Face transformers model (the worker needs the `trainjob[hf]` extra).

    `pretrained` is a directory under one of the worker's TRAINJOB_HF_MODEL_DIRS, or a
    model name already in the worker's Hugging Face cache: loading never downloads, never
    runs code from the model's repository and reads safetensors weights only. `config`
    starts from scratch: a transformers config as a JSON object with its `model_type`.
    """

    pretrained: str | None = Field(None, min_length=1, max_length=512)
    config: dict[str, Any] | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _one_source(self) -> _HfModelSpec:
        if (self.pretrained is None) == (self.config is None):
            raise _field_error("model.pretrained", "give exactly one of pretrained and config")
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise _field_error(
                "model.config.model_type", "is required: the transformers model type, e.g. 'gpt2'"
            )
        return self


class HfCausalLmSpec(_HfModelSpec):
    type: Literal["hf-causal-lm"] = "hf-causal-lm"


class HfSequenceClassificationSpec(_HfModelSpec):
    type: Literal["hf-sequence-classification"] = "hf-sequence-classification"


_BuiltinModelSpec = MlpSpec | CnnSpec | TinyGptSpec | HfCausalLmSpec | HfSequenceClassificationSpec
BUILTIN_MODELS = _by_type(_BuiltinModelSpec)
ModelSpec = _BuiltinModelSpec | PluginModelSpec


# ---------------------------------------------------------------- datasets


class SyntheticClassificationSpec(_Strict):
    type: Literal["synthetic-classification"] = "synthetic-classification"
    n_samples: int = Field(512, ge=2, le=1_000_000)
    n_features: int = Field(16, ge=1, le=4096)
    n_classes: int = Field(4, ge=2, le=1000)
    noise: float = Field(0.5, ge=0.0, le=100.0)
    eval_fraction: float = Field(DEFAULT_EVAL_FRACTION, ge=0.0, le=0.5)


class DigitsSpec(_Strict):
    type: Literal["digits"] = "digits"
    eval_fraction: float = Field(DEFAULT_EVAL_FRACTION, ge=0.0, le=0.5)


class TinyTextSpec(_Strict):
    type: Literal["tiny-text"] = "tiny-text"
    min_length: int = Field(8, ge=2, le=2048)
    max_length: int = Field(64, ge=2, le=2048)
    eval_fraction: float = Field(DEFAULT_EVAL_FRACTION, ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _lengths_ordered(self) -> TinyTextSpec:
        if self.min_length > self.max_length:
            # Only ever nested as JobSpec.dataset: the error names its full path.
            raise _field_error(
                "dataset.min_length",
                f"must not exceed max_length ({self.max_length}), not {self.min_length}",
            )
        return self


FILE_ID_PATTERN = r"^file_[0-9a-f]{24}$"
FileFormat = Literal["jsonl", "csv", "npz"]
Tokenizer = Literal["byte", "char", "model"]


class FileDatasetSpec(_Strict):
    """A file uploaded through /v1/files (see docs/files.md for the formats).

    What the rows hold (text, prompt/completion, chat messages, features with a label or
    a target, arrays) is read from the file when it is validated; `format` overrides the format
    detected from the file's name. Text is tokenized byte-level by default (`char`: the
    training file's characters; `model`: the Hugging Face model's own tokenizer, the
    default for hf-* models) and cut to `max_length` tokens.
    """

    type: Literal["file"] = "file"
    file_id: str = Field(pattern=FILE_ID_PATTERN)
    validation_file_id: str | None = Field(None, pattern=FILE_ID_PATTERN)
    format: FileFormat | None = None
    # 128 tokens fit tiny-gpt's default block_size (max_length - 1 positions).
    max_length: int = Field(128, ge=2, le=8192)
    tokenizer: Tokenizer | None = None
    # Held out from the training file when there is no validation file (then 0 by default:
    # the validation file is what is evaluated).
    eval_fraction: float = Field(DEFAULT_EVAL_FRACTION, ge=0.0, le=0.5)
    # Text, prompt/completion and chat rows packed into sequences of max_length, each row
    # attending only to itself and counted as unpacked (worker/engine/packing.py); a
    # sample (batch_size counts them) is then a pack of rows.
    packing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nothing_held_out_beside_a_validation_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("validation_file_id") is not None:
            return {"eval_fraction": 0.0, **data}
        return data

    @property
    def file_ids(self) -> list[str]:
        return [self.file_id] + ([self.validation_file_id] if self.validation_file_id else [])


class PluginDatasetSpec(BaseModel):
    """A dataset registered through the `trainjob.datasets` entry point group."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str


_BuiltinDatasetSpec = SyntheticClassificationSpec | DigitsSpec | TinyTextSpec | FileDatasetSpec
BUILTIN_DATASETS = _by_type(_BuiltinDatasetSpec)
DatasetSpec = _BuiltinDatasetSpec | PluginDatasetSpec

# What each built-in model needs from its data: flat features, images, or tokens.
# A file's kind is known only once it is validated: the submit route checks those.
_MODEL_INPUT_KIND = {
    "mlp": "features",
    "cnn": "images",
    "tiny-gpt": "tokens",
    "hf-causal-lm": "tokens",
    "hf-sequence-classification": "labelled_text",
}
_DATASET_INPUT_KINDS = {
    "synthetic-classification": {"features"},
    "digits": {"features", "images"},
    "tiny-text": {"tokens"},
}


@cache
def plugin_names(group: str) -> frozenset[str]:
    """Names registered by installed packages under an entry point group (no import)."""
    return frozenset(entry_point.name for entry_point in entry_points(group=group))


_REGISTRIES: dict[str, tuple[dict[str, type[BaseModel]], type[BaseModel], str]] = {
    "model": (BUILTIN_MODELS, PluginModelSpec, MODEL_ENTRY_POINT_GROUP),
    "dataset": (BUILTIN_DATASETS, PluginDatasetSpec, DATASET_ENTRY_POINT_GROUP),
}


def known_types(what: str) -> list[str]:
    """Every type name a spec's "model" or "dataset" (`what`) may give: built-in or plugin."""
    builtins, _, group = _REGISTRIES[what]
    return sorted(set(builtins) | plugin_names(group))


# ---------------------------------------------------------------- training


# A tuple, not a set: `in` compares with ==, so a body's list or object as `type` is
# no TypeError before the field's own validation names it.
ADAMW_OPTIMIZERS = ("adamw", "adamw8bit")


class OptimizerSpec(_Strict):
    """`lr` defaults by `type`: SGD_LR for sgd, ADAMW_LR for adamw and adamw8bit. Within a
    JobSpec the type, and the lr of a pretrained model, default by model (see JobSpec).

    `adamw8bit` is AdamW with its two moments kept 8-bit (bitsandbytes, CUDA workers only):
    the same fields as `adamw`."""

    type: Literal["sgd", "adamw", "adamw8bit"] = "sgd"
    lr: float = Field(SGD_LR, gt=0.0, le=10.0)
    momentum: _Fraction = Field(0.0, description="SGD only")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[_Fraction, _Fraction] = (0.9, 0.999)

    @model_validator(mode="before")
    @classmethod
    def _lr_for_the_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in ADAMW_OPTIMIZERS:
            return {"lr": ADAMW_LR, **data}
        return data


class LrScheduleSpec(_Strict):
    type: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)


# Models a `lora` adapter can be put on (worker/engine/lora.py).
LORA_MODELS = HF_MODELS | {"tiny-gpt"}


class LoraSpec(_Strict):
    """LoRA adapters (through peft): the model's weights stay frozen and a low-rank update
    B·A of rank `r`, scaled by `alpha / r`, trains beside each targeted linear layer.
    `target_modules` are module names (or name suffixes) of the model; left out, tiny-gpt
    targets "qkv" and "proj" and a transformers model peft's default for its architecture."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0.0, le=65536.0)
    dropout: _Fraction = 0.0
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, min_length=1, max_length=64
    )


class ElasticSpec(_Strict):
    """A multi-node job may resume on as few as `min_nodes` nodes (after a node is lost),
    with the same global batch: each rank accumulates more of every window."""

    min_nodes: int = Field(1, ge=1, le=MAX_NODES)


class KeepCheckpointsSpec(_Strict):
    """Checkpoint retention: the `last` newest and the `best` lowest-eval_loss (train loss
    when the job has no evaluation). The latest checkpoint, which a resumed run starts
    from, and the best one are never deleted."""

    last: int = Field(1, ge=1, le=10_000)
    best: int = Field(0, ge=0, le=10_000)


class MlflowTrackingSpec(_Strict):
    """A run in the MLflow experiment `experiment` (created if missing) on the server the
    operator configures (TRAINJOB_MLFLOW_TRACKING_URI); `run_name` defaults to the job's
    name, else its id. Bounded by MLflow's own columns (experiment names 256, run names
    250 characters)."""

    experiment: str = Field(min_length=1, max_length=256)
    run_name: str | None = Field(None, min_length=1, max_length=250)


class TrackingSpec(_Strict):
    """Where a job's params, per-step metrics and final weights are logged (worker/
    tracking/). Not a training field: it changes no weight, and a checkpoint resumes
    with or without it."""

    mlflow: MlflowTrackingSpec


Precision = Literal["fp32", "fp64", "bf16", "fp16"]
# How the frozen base of an hf-* model is loaded (QLoRA): 4-bit NormalFloat or 8-bit.
Quantize = Literal["nf4", "int8"]
DEFAULT_PRIORITY = 500
MAX_PRIORITY = 1000
Device = Literal["auto", "cpu", "cuda"]


class JobSpec(_Strict):
    """A training job. Give two of micro_batch_size, accumulation_steps, batch_size; the
    batch is micro_batch_size × accumulation_steps × devices × nodes."""

    name: str | None = Field(None, max_length=128)
    metadata: (
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None
    ) = Field(None, max_length=16)
    model: ModelSpec
    dataset: DatasetSpec
    micro_batch_size: int | Literal["auto"] | None = Field(None)
    accumulation_steps: int | None = Field(None, ge=1, le=MAX_ACCUMULATION_STEPS)
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    epochs: int | None = Field(None, ge=1, le=1000)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    # Train LoRA adapters instead of the whole model (tiny-gpt and hf-* models).
    lora: LoraSpec | None = None
    lr_schedule: LrScheduleSpec = Field(default_factory=LrScheduleSpec)
    grad_clip_norm: float | None = Field(None, gt=0.0, le=1e6)
    precision: Precision = "fp32"
    # The base model's weights loaded 4-bit (nf4) or 8-bit (int8) through bitsandbytes and
    # frozen; CUDA workers only (a CPU worker fails the job with invalid_spec).
    quantize: Quantize | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Device = "auto"
    # Processes training the job together, one per device: each window of batch_size
    # samples is split among them (worker/engine/distributed.py).
    devices: int = Field(1, ge=1, le=MAX_DEVICES)
    # Worker nodes training the job together (gang-scheduled, app/jobs/gangs.py), each on
    # `devices` devices: devices × nodes processes share every window.
    nodes: int = Field(1, ge=1, le=MAX_NODES)
    # Whether a multi-node job may run on fewer nodes (never fewer than min_nodes).
    elastic: ElasticSpec | None = None
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS)
    eval_every: int = Field(0, ge=0, le=MAX_STEPS)
    # None keeps every checkpoint.
    keep_checkpoints: KeepCheckpointsSpec | None = None
    # How many runs may end in an infrastructure failure (worker lost, lease expired,
    # connection lost) before the job fails; deterministic failures never retry.
    max_attempts: int = Field(3, ge=1, le=10)
    # Training time over all attempts; on expiry the job checkpoints and fails `timeout`.
    max_runtime_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600)
    # Higher runs first (app/jobs/scheduling.py); a tenant's or key's cap may lower the
    # most it may ask for.
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)
    # Whether a waiting job of higher priority may take its device (it resumes later,
    # exactly); false needs an admin key.
    preemptible: bool = True
    # Recompute each block's activations in backward instead of keeping them: less memory,
    # about a third more compute, and the same weights bit for bit (dropout included).
    activation_checkpointing: bool = False
    # Experiment tracking (MLflow): logs, never trains; a tracking failure never fails the job.
    tracking: TrackingSpec | None = None

    @field_validator("model", "dataset", mode="before")
    @classmethod
    def _from_registry(cls, value: Any, info: ValidationInfo) -> BaseModel:
        what = str(info.field_name)  # "model" or "dataset"
        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "object_type", "{what} must be an object with a 'type'", {"what": what}
            )
        builtins, plugin_class, group = _REGISTRIES[what]
        type_name = value.get("type")
        # A list or an object is no type name (and is unhashable: no `in` on a dict).
        if isinstance(type_name, str) and type_name in builtins:
            return builtins[type_name].model_validate(value)
        if isinstance(type_name, str) and type_name in plugin_names(group):
            return plugin_class.model_validate(value)
        raise PydanticCustomError(
            "unknown_type",
            "unknown {what} type '{type}'; known: {known}",
            {"what": what, "type": type_name, "known": ", ".join(known_types(what))},
        )

    @field_validator("micro_batch_size")
    @classmethod
    def _micro_batch_in_range(cls, value: int | str | None) -> Any:
        if isinstance(value, int) and not 1 <= value <= MAX_MICRO_BATCH_SIZE:
            raise PydanticCustomError(
                "micro_batch_range",
                "must be between 1 and {high}, or 'auto'",
                {"high": MAX_MICRO_BATCH_SIZE},
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _reject_unstorable_values(cls, data: Any) -> Any:
        # Before any field is read, over the raw body: JSON has no NaN/Infinity, but
        # Python's json module reads them (and 1e400 as inf), so no bound may be
        # compared against a NaN; PostgreSQL text cannot hold a NUL character; and a
        # body nested hundreds deep would exhaust the stack of any recursive walk.
        problem = _first_unstorable_value(data)
        if problem is not None:
            raise _field_error(*problem)
        return data

    @model_validator(mode="before")
    @classmethod
    def _optimizer_for_the_model(cls, data: Any) -> Any:
        """The optimizer fields a spec leaves out, as the model is usually trained: AdamW for
        transformers, at FINE_TUNING_LR when they start from pretrained weights; SGD for the
        small built-in MLP and CNN and for plugins."""
        # Only what the body leaves out: a stored spec has every value spelled out, so it
        # validates to the same optimizer whatever these defaults become.
        if not isinstance(data, dict):
            return data
        model, optimizer = data.get("model"), data.get("optimizer", {})
        if isinstance(model, BaseModel):
            model = model.model_dump()
        if not isinstance(optimizer, dict) or not isinstance(model, dict):
            return data
        model_type = model.get("type")
        if not isinstance(model_type, str):
            return data  # the model's own validation says what is wrong
        optimizer_type = optimizer.get("type", "adamw" if model_type in ADAMW_MODELS else "sgd")
        defaults: dict[str, Any] = {"type": optimizer_type}
        pretrained = model_type in HF_MODELS and model.get("pretrained")
        if optimizer_type in ADAMW_OPTIMIZERS and pretrained:
            defaults["lr"] = FINE_TUNING_LR
        return {**data, "optimizer": {**defaults, **optimizer}}

    @model_validator(mode="after")
    def _derive_batch_arithmetic(self) -> JobSpec:
        micro, steps, batch = self.micro_batch_size, self.accumulation_steps, self.batch_size
        devices = self.processes
        # Named in messages only when there are several: one device reads as before.
        times_devices = " × devices" if self.devices > 1 else ""
        if self.nodes > 1:
            times_devices += " × nodes"
        if micro == "auto":
            if batch is None:
                raise _field_error("batch_size", "is required when micro_batch_size is 'auto'")
            if batch % devices:
                processes = "devices × nodes" if self.nodes > 1 else "devices"
                raise _field_error(
                    "batch_size", f"must be a multiple of {processes} ({devices}), not {batch}"
                )
            if steps not in (None, 1):
                raise _field_error(
                    "accumulation_steps",
                    "is derived when micro_batch_size is 'auto' (it starts at 1 and grows as "
                    "out-of-memory backoff halves the micro-batch); leave it out",
                )
            return self._with(accumulation_steps=1)
        given = sum(value is not None for value in (micro, steps, batch))
        if given < 2:
            raise _field_error(
                "batch_size",
                "give two of micro_batch_size, accumulation_steps and batch_size",
            )
        if micro is not None and steps is not None:
            product = int(micro) * steps * devices
            named = f"micro_batch_size × accumulation_steps{times_devices}"
            if batch is not None and batch != product:
                raise _field_error("batch_size", f"must equal {named} = {product}, not {batch}")
            if product > MAX_BATCH_SIZE:
                raise _field_error(
                    "batch_size", f"{named} = {product} exceeds the maximum of {MAX_BATCH_SIZE}"
                )
            return self._with(batch_size=product)
        # Two given, one of them the batch: the other divides it into the third.
        assert batch is not None
        divisor_name, derived_name, high = (
            ("micro_batch_size", "accumulation_steps", MAX_ACCUMULATION_STEPS)
            if micro is not None
            else ("accumulation_steps", "micro_batch_size", MAX_MICRO_BATCH_SIZE)
        )
        divisor: int = getattr(self, divisor_name) * devices
        divided_by = f"({divisor_name}{times_devices})" if times_devices else divisor_name
        if batch % divisor:
            raise _field_error(
                "batch_size",
                f"must be a multiple of {divisor_name}{times_devices} ({divisor}), not {batch}",
            )
        derived = batch // divisor
        if derived > high:
            raise _field_error(
                derived_name, f"batch_size / {divided_by} = {derived} exceeds the maximum of {high}"
            )
        return self._with(**{derived_name: derived})

    @model_validator(mode="after")
    def _elastic_within_nodes(self) -> JobSpec:
        if self.elastic is not None and self.elastic.min_nodes > self.nodes:
            raise _field_error(
                "elastic.min_nodes",
                f"must be at most nodes ({self.nodes}), not {self.elastic.min_nodes}",
            )
        return self

    @model_validator(mode="after")
    def _lora_on_a_model_that_takes_it(self) -> JobSpec:
        if self.lora is not None and self.model.type not in LORA_MODELS:
            raise _field_error(
                "lora",
                f"LoRA adapters go on {', '.join(sorted(LORA_MODELS))}; "
                f"not on model {self.model.type!r}",
            )
        return self

    @model_validator(mode="after")
    def _exactly_one_length(self) -> JobSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise _field_error("max_steps", "give exactly one of max_steps and epochs")
        return self

    @model_validator(mode="after")
    def _dataset_fits_the_job(self) -> JobSpec:
        model, dataset = self.model, self.dataset
        if isinstance(dataset, FileDatasetSpec):
            nothing_held_out = dataset.validation_file_id is None and dataset.eval_fraction == 0
            if self.eval_every > 0 and nothing_held_out:
                raise _field_error(
                    "eval_every",
                    "there is nothing to evaluate on: give dataset.validation_file_id or "
                    "a dataset.eval_fraction above 0",
                )
            if dataset.tokenizer == "model" and not isinstance(model, _HfModelSpec):
                raise _field_error(
                    "dataset.tokenizer",
                    f"'model' needs a Hugging Face model (hf-*), not {model.type!r}; "
                    "use 'byte' or 'char'",
                )
            if dataset.packing and model.type not in PACKING_MODELS:
                raise _field_error(
                    "dataset.packing",
                    "needs a model that keeps packed rows apart "
                    f"({', '.join(sorted(PACKING_MODELS))}), not {model.type!r}; "
                    "train without packing",
                )
        # Texts are cut to max_length tokens (whatever a file holds): a sequence of n
        # tokens gives n-1 (input, target) positions.
        if (
            isinstance(model, TinyGptSpec)
            and isinstance(dataset, FileDatasetSpec | TinyTextSpec)
            and dataset.max_length - 1 > model.block_size
        ):
            raise _field_error(
                "model.block_size",
                f"must be at least dataset.max_length - 1 = {dataset.max_length - 1}",
            )
        model_kind = _MODEL_INPUT_KIND.get(model.type)
        data_kinds = _DATASET_INPUT_KINDS.get(dataset.type)
        # None: a plugin (the worker checks when it builds) or a file (checked at submit,
        # once the file's kind is known).
        if model_kind is not None and data_kinds is not None and model_kind not in data_kinds:
            fitting = sorted(
                [name for name, kinds in _DATASET_INPUT_KINDS.items() if model_kind in kinds]
                + ["file"]
            )
            raise _field_error(
                "dataset.type",
                f"model {model.type!r} cannot train on {dataset.type!r}; "
                f"use one of: {', '.join(fitting)}",
            )
        return self

    @model_validator(mode="after")
    def _cuda_only_options_fit_the_job(self) -> JobSpec:
        """quantize and adamw8bit run bitsandbytes' CUDA kernels. What the spec alone shows
        is refused here (422); whether a worker has CUDA only the worker knows (it fails
        the job with invalid_spec, worker/engine/quantize.py)."""
        if self.quantize is not None:
            if not isinstance(self.model, _HfModelSpec):
                raise _field_error(
                    "quantize",
                    "needs a Hugging Face model (hf-causal-lm, hf-sequence-classification), "
                    f"not {self.model.type!r}",
                )
            if self.model.pretrained is None:
                raise _field_error(
                    "quantize",
                    "needs model.pretrained: a quantized base is frozen, so a randomly "
                    "initialised one would stay random",
                )
            if self.lora is None:
                raise _field_error(
                    "lora",
                    "is required with quantize: a quantized base is frozen, only adapters train",
                )
        asked = cuda_only_options(self)
        if asked and self.precision == "fp64":
            raise _field_error(
                "precision",
                f"'fp64' cannot be used with {' and '.join(asked)}: bitsandbytes computes in "
                "fp32, bf16 and fp16",
            )
        if asked and self.device == "cpu":
            raise _field_error(
                "device",
                f"'cpu' cannot run {' and '.join(asked)}: bitsandbytes needs a CUDA device; "
                "use 'auto' or 'cuda'",
            )
        return self

    @model_validator(mode="after")
    def _model_can_checkpoint(self) -> JobSpec:
        model_type = self.model.type
        if self.activation_checkpointing and model_type not in ACTIVATION_CHECKPOINTING_MODELS:
            supported = ", ".join(sorted(ACTIVATION_CHECKPOINTING_MODELS))
            raise _field_error(
                "activation_checkpointing",
                f"model {model_type!r} cannot recompute its activations; only {supported} "
                "can (a plugin model checkpoints inside itself, through its own parameters)",
            )
        return self

    @model_validator(mode="after")
    def _fits_in_memory(self) -> JobSpec:
        parameters = estimate_parameters(self)
        if parameters is not None and parameters > MAX_PARAMETERS:
            raise _field_error(
                "model", f"has about {parameters:,} parameters; the maximum is {MAX_PARAMETERS:,}"
            )
        field = "batch_size" if self.micro_batch_size == "auto" else "micro_batch_size"
        # 'auto' starts with each device's whole share of the batch in one micro-batch.
        largest_micro = getattr(self, field) // (self.processes if field == "batch_size" else 1)
        per_sample = estimate_activation_elements_per_sample(self)
        if (
            per_sample is not None
            and isinstance(largest_micro, int)
            and per_sample * largest_micro > MAX_ACTIVATION_ELEMENTS
        ):
            limit = MAX_ACTIVATION_ELEMENTS // per_sample
            raise _field_error(
                field,
                f"a micro-batch of {largest_micro} would need about "
                f"{per_sample * largest_micro:,} activation elements; at most {limit} "
                "samples fit this model in one micro-batch",
            )
        return self

    def _with(self, **changes: Any) -> JobSpec:
        # The model is frozen, but derived fields are filled in on `self` while it is
        # still being validated: pydantic ignores a different instance returned from an
        # after-validator when validating through __init__ (JobSpec(...)).
        self.__dict__.update(changes)
        self.__pydantic_fields_set__.update(changes)
        return self

    @property
    def processes(self) -> int:
        """The ranks of the job's group as submitted: devices per node × nodes."""
        return self.devices * self.nodes

    @property
    def min_nodes(self) -> int:
        """The fewest nodes the job may run on (`elastic.min_nodes`, else all of them)."""
        return self.nodes if self.elastic is None else self.elastic.min_nodes

    @property
    def window_size(self) -> int:
        """The effective batch m·k·devices·nodes: samples per optimizer step."""
        assert self.batch_size is not None
        return self.batch_size


def cuda_only_options(spec: JobSpec) -> list[str]:
    """The options of `spec` that need bitsandbytes on a CUDA device, as a user wrote them."""
    asked = [] if spec.quantize is None else [f"quantize {spec.quantize!r}"]
    if spec.optimizer.type == "adamw8bit":
        asked.append("optimizer.type 'adamw8bit'")
    return asked


def _field_error(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(
        "invalid_field", "{field}: {message}", {"field": field, "message": message}
    )


def _first_unstorable_value(data: Any) -> tuple[str, str] | None:
    """(dotted path, message) of the shallowest non-finite number, string with a NUL
    character or object nested deeper than MAX_NESTING; None if there is none.
    Breadth-first without recursion, so that no depth of input can overflow the stack."""
    pending: deque[tuple[tuple[Any, ...], Any]] = deque([((), data)])
    while pending:
        path, value = pending.popleft()
        where = ".".join(map(str, path))
        if isinstance(value, float) and not math.isfinite(value):
            return where, "numbers must be finite"
        if isinstance(value, str) and "\x00" in value:
            return where, "must not contain a NUL character (\\u0000)"
        if isinstance(value, dict | list | tuple) and len(path) >= MAX_NESTING:
            return where, f"nested deeper than {MAX_NESTING} levels"
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and "\x00" in key:
                    return where, "keys must not contain a NUL character (\\u0000)"
                pending.append(((*path, key), item))
        elif isinstance(value, list | tuple):
            pending.extend(((*path, index), item) for index, item in enumerate(value))
    return None


def _features_and_classes(dataset: BaseModel) -> tuple[int, int] | None:
    """(values per sample, classes) of a built-in data set of features; None for others."""
    if isinstance(dataset, SyntheticClassificationSpec):
        return dataset.n_features, dataset.n_classes
    if isinstance(dataset, DigitsSpec):
        return 64, 10
    return None


# tiny-text's character vocabulary is well under this; an upper bound is enough here.
_TEXT_VOCAB_BOUND = 256


def estimate_parameters(spec: JobSpec) -> int | None:
    """Parameter count of a built-in model, without building it (None for plugins)."""
    model = spec.model
    if isinstance(model, MlpSpec):
        data = _features_and_classes(spec.dataset)
        if data is None:
            return None
        widths = [data[0], *model.hidden_sizes, data[1]]
        return sum((a + 1) * b for a, b in itertools.pairwise(widths))
    if isinstance(model, CnnSpec):
        channels = [1, *model.channels]
        conv = sum((a * model.kernel_size**2 + 1) * b for a, b in itertools.pairwise(channels))
        _, classes = _features_and_classes(spec.dataset) or (64, 10)
        return (
            conv
            + (model.channels[-1] * 64 + 1) * model.hidden_size
            + (model.hidden_size + 1) * classes
        )
    if isinstance(model, TinyGptSpec):
        width = model.n_embd
        per_layer = 12 * width * width + 13 * width
        embeddings = (_TEXT_VOCAB_BOUND + model.block_size) * width
        return model.n_layer * per_layer + embeddings + 2 * width
    return None


def estimate_activation_elements_per_sample(spec: JobSpec) -> int | None:
    """A rough upper bound on the activations one sample keeps for backward."""
    model = spec.model
    if isinstance(model, MlpSpec):
        data = _features_and_classes(spec.dataset)
        return None if data is None else 2 * (data[0] + sum(model.hidden_sizes) + 1000)
    if isinstance(model, CnnSpec):
        return 4 * 64 * sum(model.channels) + 2 * model.hidden_size
    if isinstance(model, TinyGptSpec):
        tokens = model.block_size
        per_layer = 16 * tokens * model.n_embd + 2 * model.n_head * tokens * tokens
        if spec.activation_checkpointing:
            # Each block keeps only its input; one block at a time holds all of its own
            # while backward recomputes it.
            kept = model.n_layer * tokens * model.n_embd + per_layer
            return kept + tokens * _TEXT_VOCAB_BOUND
        return model.n_layer * per_layer + tokens * _TEXT_VOCAB_BOUND
    return None


def validation_messages(error: ValidationError) -> list[str]:
    """One line per bad field, each starting with the field's dotted path."""
    lines = []
    for item in error.errors():
        context = item.get("ctx") or {}
        if context.get("field"):
            location, message = str(context["field"]), str(context["message"])
        else:
            location = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    return lines
