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
    ModelSpec,
    known_datasets,
    known_models,
)
from worker.engine import datasets, models
from worker.engine.data_types import DataInfo, DataSplits
from worker.engine.errors import TrainingError

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


def _plugin(group: str, name: str) -> Callable[..., Any] | None:
    for entry_point in entry_points(group=group, name=name):
        return cast(Callable[..., Any], entry_point.load())
    return None


def build_model(spec: ModelSpec, info: DataInfo) -> nn.Module:
    name = str(spec.type)
    if name in BUILTIN_MODEL_BUILDERS:
        return BUILTIN_MODEL_BUILDERS[name](spec, info)
    plugin = _plugin(MODEL_ENTRY_POINT_GROUP, name)
    if plugin is None:
        raise TrainingError(
            "invalid_spec", f"unknown model type {name!r}; known: {', '.join(known_models())}"
        )
    return cast(nn.Module, plugin(spec.model_dump(), info))


def build_dataset(spec: DatasetSpec, seed: int) -> DataSplits:
    name = str(spec.type)
    if name in BUILTIN_DATASET_BUILDERS:
        return BUILTIN_DATASET_BUILDERS[name](spec, seed)
    plugin = _plugin(DATASET_ENTRY_POINT_GROUP, name)
    if plugin is None:
        raise TrainingError(
            "invalid_spec", f"unknown dataset type {name!r}; known: {', '.join(known_datasets())}"
        )
    return cast(DataSplits, plugin(spec.model_dump(), seed))
