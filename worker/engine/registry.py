"""Model and data set registries: the built-ins plus entry points of installed packages.

A package registers more with entry points in the groups `trainjob.models` and
`trainjob.datasets`. A model entry point is `build(spec: dict, info: DataInfo) ->
nn.Module`; a data set entry point is `build(spec: dict, seed: int) -> DataSplits`.
The spec names registry entries only: nothing a user sends is imported or executed.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, cast

from torch import nn

from app.jobs.spec import (
    DATASET_ENTRY_POINT_GROUP,
    MODEL_ENTRY_POINT_GROUP,
    DatasetSpec,
    FileDatasetSpec,
    HfCausalLmSpec,
    HfSequenceClassificationSpec,
    JobSpec,
    ModelSpec,
    known_types,
)
from worker.datafiles.load import FileSource, load_file_dataset
from worker.datafiles.tokenizers import TextTokenizer
from worker.engine import datasets, hf, models
from worker.engine.data_types import DataInfo, DataSplits
from worker.engine.errors import TrainingError
from worker.engine.quantize import Quantization

ModelBuilder = Callable[[Any, DataInfo], nn.Module]
DatasetBuilder = Callable[[Any, int], DataSplits]

BUILTIN_MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "mlp": models.build_mlp,
    "cnn": models.build_cnn,
    "tiny-gpt": models.build_tiny_gpt,
}

BUILTIN_DATASET_BUILDERS: dict[str, DatasetBuilder] = {
    "synthetic-classification": datasets.synthetic_classification,
    "digits": datasets.digits,
    "tiny-text": datasets.tiny_text,
}


def _plugin(group: str, what: str, name: str) -> Callable[..., Any]:
    for entry_point in entry_points(group=group, name=name):
        return cast(Callable[..., Any], entry_point.load())
    known = ", ".join(known_types(what))
    raise TrainingError("invalid_spec", f"unknown {what} type {name!r}; known: {known}")


def build_model(
    spec: ModelSpec,
    info: DataInfo,
    hf_limits: hf.HfLimits = hf.DEFAULT_LIMITS,
    quantization: Quantization | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """The spec's model. A Hugging Face one is loaded within `hf_limits` (refused over its
    parameter bound before its weights exist), its base quantized with `quantization`
    (which the job spec allows on hf-* models only); the built-in ones are bounded by the
    spec. `activation_checkpointing`: its blocks recompute their activations in backward."""
    model = _build_model(spec, info, hf_limits, quantization)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _build_model(
    spec: ModelSpec, info: DataInfo, hf_limits: hf.HfLimits, quantization: Quantization | None
) -> nn.Module:
    if isinstance(spec, HfCausalLmSpec):
        return hf.build_hf_causal_lm(spec, info, hf_limits, quantization)
    if isinstance(spec, HfSequenceClassificationSpec):
        return hf.build_hf_sequence_classification(spec, info, hf_limits, quantization)
    name = str(spec.type)
    if name in BUILTIN_MODEL_BUILDERS:
        return BUILTIN_MODEL_BUILDERS[name](spec, info)
    plugin = _plugin(MODEL_ENTRY_POINT_GROUP, "model", name)
    return cast(nn.Module, plugin(spec.model_dump(), info))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute the blocks of a built model in backward. The spec allows it for the models
    of ACTIVATION_CHECKPOINTING_MODELS only; anything else is refused here too."""
    # A peft model (LoRA) around ours: its base model is ours, adapters injected in place.
    base = cast(nn.Module, getattr(model, "get_base_model", lambda: model)())
    if isinstance(base, models.TinyGpt):
        base.activation_checkpointing = True
    elif isinstance(base, hf.CausalLm | hf.SequenceClassifier):
        hf.enable_activation_checkpointing(base)
    else:
        raise TrainingError(
            "invalid_spec",
            f"activation_checkpointing: {type(base).__name__} models cannot recompute "
            "their activations",
        )


def build_dataset(
    spec: DatasetSpec,
    seed: int,
    files: FileSource | None = None,
    tokenizer: TextTokenizer | None = None,
    model: str = "the model",
) -> DataSplits:
    """A data set's splits. A `file` data set reads its files through `files` (only the
    service has them) and encodes text with `tokenizer` (None: byte or char level);
    `model` names the model in its errors (`model_name`)."""
    if isinstance(spec, FileDatasetSpec):
        if files is None:
            raise TrainingError(
                "invalid_spec",
                "dataset type 'file' trains on files uploaded to the service (POST /v1/files): "
                "submit this job to the service; a local run trains on the built-in and "
                "plugin data sets only",
            )
        return load_file_dataset(spec, seed, files, tokenizer, model)
    name = str(spec.type)
    if name in BUILTIN_DATASET_BUILDERS:
        return BUILTIN_DATASET_BUILDERS[name](spec, seed)
    plugin = _plugin(DATASET_ENTRY_POINT_GROUP, "dataset", name)
    return cast(DataSplits, plugin(spec.model_dump(), seed))


def model_name(spec: ModelSpec) -> str:
    """How an error names the model: a pretrained model by its name or path."""
    if isinstance(spec, HfCausalLmSpec | HfSequenceClassificationSpec):
        if spec.pretrained is not None:
            return f"model {spec.pretrained!r}"
        return f"model {spec.type!r} (built from a config)"
    return f"model {spec.type!r}"


def model_tokenizer(
    spec: JobSpec, hf_limits: hf.HfLimits = hf.DEFAULT_LIMITS
) -> TextTokenizer | None:
    """The tokenizer a file data set's text is encoded with when the model brings one: a
    Hugging Face model's own (dataset.tokenizer "model" or unset; None when the model has
    none saved, which means byte level), found in `hf_limits.model_dirs`. None also for
    "byte" and "char", which the loader builds, and for every other data set."""
    dataset = spec.dataset
    if not isinstance(dataset, FileDatasetSpec) or dataset.tokenizer in ("byte", "char"):
        return None
    if isinstance(spec.model, HfCausalLmSpec | HfSequenceClassificationSpec):
        return hf.load_tokenizer(spec.model, hf_limits.model_dirs)
    if dataset.tokenizer == "model":
        raise TrainingError(
            "invalid_spec",
            "dataset.tokenizer 'model' needs a Hugging Face model (hf-causal-lm, "
            f"hf-sequence-classification), not {spec.model.type!r}: use 'byte' or 'char'",
        )
    return None
