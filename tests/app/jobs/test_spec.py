"""The job spec: one test per validation rule, each error naming its field; derivations,
defaults, round trips and the plugin registry. Pure pydantic: no database, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.jobs import spec as spec_module
from app.jobs.spec import (
    DATASET_ENTRY_POINT_GROUP,
    MAX_ACCUMULATION_STEPS,
    MAX_BATCH_SIZE,
    MAX_MICRO_BATCH_SIZE,
    MODEL_ENTRY_POINT_GROUP,
    CnnSpec,
    DigitsSpec,
    JobSpec,
    LrScheduleSpec,
    MlpSpec,
    OptimizerSpec,
    PluginDatasetSpec,
    PluginModelSpec,
    SyntheticClassificationSpec,
    TinyGptSpec,
    TinyTextSpec,
    estimate_activation_elements_per_sample,
    estimate_parameters,
    known_types,
    plugin_names,
    validation_messages,
)

REPO_ROOT = Path(__file__).resolve().parents[3]

FILE_ID = "file_" + "0" * 24
VALIDATION_ID = "file_" + "1" * 24

# Marks a top-level key to leave out of the spec (None is a value some fields accept).
REMOVE: Any = object()


# ---------------------------------------------------------------- helpers


def base_spec(**changes: Any) -> dict[str, Any]:
    """A small valid spec (mlp on synthetic data, m=8, k=4); keywords replace top-level
    fields, and REMOVE drops one."""
    data: dict[str, Any] = {
        "model": {"type": "mlp"},
        "dataset": {"type": "synthetic-classification"},
        "micro_batch_size": 8,
        "accumulation_steps": 4,
        "max_steps": 10,
    }
    return apply_changes(data, changes)


def gpt_spec(model: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A valid tiny-gpt on tiny-text spec; `model` adds to the tiny-gpt fields."""
    return base_spec(**{"dataset": {"type": "tiny-text"}, **changes}) | {
        "model": {"type": "tiny-gpt", **(model or {})}
    }


def batch_spec(**batch_fields: Any) -> dict[str, Any]:
    """A valid spec whose batch fields are exactly the ones given."""
    data = base_spec(micro_batch_size=REMOVE, accumulation_steps=REMOVE)
    return apply_changes(data, batch_fields)


def apply_changes(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is REMOVE:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def rejection(data: dict[str, Any]) -> list[str]:
    """The one-line-per-field messages of a spec that must not validate."""
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(data)
    return validation_messages(caught.value)


def assert_rejected(data: dict[str, Any], field: str, *fragments: str) -> str:
    """The spec is refused with a line `<field>: ...` that holds every fragment."""
    lines = rejection(data)
    named = [line for line in lines if line.startswith(f"{field}: ")]
    assert named, f"no line names {field!r}: {lines}"
    for fragment in fragments:
        assert any(fragment in line for line in named), f"{fragment!r} not in {named}"
    return named[0]


# The large transformer whose parameters fit (about 77M) but whose activations allow
# only 2 samples (about 2e9 elements each) in one micro-batch.
WIDE_GPT: dict[str, Any] = {"n_layer": 24, "n_embd": 512, "n_head": 8, "block_size": 2048}
WIDE_GPT_DATASET: dict[str, Any] = {"type": "tiny-text", "max_length": 2048}


def wide_gpt_spec(**changes: Any) -> dict[str, Any]:
    return gpt_spec(WIDE_GPT, dataset=WIDE_GPT_DATASET, **changes)


# ---------------------------------------------------------------- bad specs


def _case(rule: str, data: dict[str, Any], field: str, *fragments: str) -> Any:
    return pytest.param(data, field, fragments, id=rule)


REGISTRY_CASES = [
    _case(
        "unknown-model-type",
        base_spec(model={"type": "resnet"}),
        "model",
        "unknown model type 'resnet'",
        "known: cnn, hf-causal-lm, hf-sequence-classification, mlp, tiny-gpt",
    ),
    _case(
        "unknown-dataset-type",
        base_spec(dataset={"type": "imagenet"}),
        "dataset",
        "unknown dataset type 'imagenet'",
        "known: digits, file, synthetic-classification, tiny-text",
    ),
    _case("model-without-type", base_spec(model={"hidden_sizes": [8]}), "model", "known:"),
    _case("model-not-an-object", base_spec(model="mlp"), "model", "must be an object"),
    _case("dataset-not-an-object", base_spec(dataset=["digits"]), "dataset", "must be an object"),
    _case(
        "unknown-model-field",
        base_spec(model={"type": "mlp", "width": 3}),
        "model.width",
        "Extra inputs are not permitted",
    ),
    _case(
        "model-field-out-of-range",
        gpt_spec({"block_size": 1}),
        "model.block_size",
        "greater than or equal to 2",
    ),
    _case(
        "dataset-field-out-of-range",
        base_spec(dataset={"type": "synthetic-classification", "n_classes": 1}),
        "dataset.n_classes",
    ),
]

BATCH_CASES = [
    _case("only-micro-batch-size", batch_spec(micro_batch_size=8), "batch_size", "give two of"),
    _case("only-accumulation-steps", batch_spec(accumulation_steps=4), "batch_size", "give two of"),
    _case("only-batch-size", batch_spec(batch_size=32), "batch_size", "give two of"),
    _case("no-batch-field", batch_spec(), "batch_size", "give two of"),
    _case(
        "product-differs-from-batch-size",
        batch_spec(micro_batch_size=8, accumulation_steps=4, batch_size=30),
        "batch_size",
        "micro_batch_size × accumulation_steps = 32, not 30",
    ),
    _case(
        "batch-size-not-multiple-of-micro-batch-size",
        batch_spec(micro_batch_size=8, batch_size=30),
        "batch_size",
        "multiple of micro_batch_size (8), not 30",
    ),
    _case(
        "micro-batch-size-above-batch-size",
        batch_spec(micro_batch_size=64, batch_size=32),
        "batch_size",
        "multiple of micro_batch_size (64), not 32",
    ),
    _case(
        "batch-size-not-multiple-of-accumulation-steps",
        batch_spec(accumulation_steps=4, batch_size=30),
        "batch_size",
        "multiple of accumulation_steps (4), not 30",
    ),
    _case(
        "product-above-max-batch-size",
        batch_spec(micro_batch_size=MAX_MICRO_BATCH_SIZE, accumulation_steps=32),
        "batch_size",
        f"= {MAX_MICRO_BATCH_SIZE * 32} exceeds the maximum of {MAX_BATCH_SIZE}",
    ),
    _case(
        "derived-micro-batch-size-above-max",
        batch_spec(accumulation_steps=1, batch_size=MAX_BATCH_SIZE),
        "micro_batch_size",
        f"= {MAX_BATCH_SIZE} exceeds the maximum of {MAX_MICRO_BATCH_SIZE}",
    ),
    _case(
        "derived-accumulation-steps-above-max",
        batch_spec(micro_batch_size=1, batch_size=MAX_BATCH_SIZE),
        "accumulation_steps",
        f"= {MAX_BATCH_SIZE} exceeds the maximum of {MAX_ACCUMULATION_STEPS}",
    ),
    _case(
        "auto-without-batch-size",
        batch_spec(micro_batch_size="auto"),
        "batch_size",
        "required when micro_batch_size is 'auto'",
    ),
    _case(
        "auto-with-accumulation-steps",
        batch_spec(micro_batch_size="auto", accumulation_steps=2, batch_size=16),
        "accumulation_steps",
        "leave it out",
    ),
    _case(
        "micro-batch-size-zero",
        base_spec(micro_batch_size=0),
        "micro_batch_size",
        f"between 1 and {MAX_MICRO_BATCH_SIZE}",
    ),
    _case(
        "micro-batch-size-above-max",
        base_spec(micro_batch_size=5000),
        "micro_batch_size",
        f"between 1 and {MAX_MICRO_BATCH_SIZE}",
    ),
    _case("accumulation-steps-zero", base_spec(accumulation_steps=0), "accumulation_steps"),
    _case(
        "accumulation-steps-above-max",
        base_spec(accumulation_steps=MAX_ACCUMULATION_STEPS + 1),
        "accumulation_steps",
    ),
    _case("batch-size-zero", batch_spec(micro_batch_size=1, batch_size=0), "batch_size"),
    _case(
        "batch-size-above-max",
        batch_spec(micro_batch_size=1, batch_size=MAX_BATCH_SIZE + 1),
        "batch_size",
    ),
]

LENGTH_CASES = [
    _case("max-steps-and-epochs", base_spec(epochs=3), "max_steps", "exactly one of"),
    _case("neither-max-steps-nor-epochs", base_spec(max_steps=REMOVE), "max_steps", "exactly one"),
    _case("max-steps-zero", base_spec(max_steps=0), "max_steps"),
    _case("max-steps-above-max", base_spec(max_steps=1_000_001), "max_steps"),
    _case("epochs-zero", base_spec(max_steps=REMOVE, epochs=0), "epochs"),
    _case("epochs-above-max", base_spec(max_steps=REMOVE, epochs=1001), "epochs"),
    _case("checkpoint-every-negative", base_spec(checkpoint_every=-1), "checkpoint_every"),
    _case("eval-every-negative", base_spec(eval_every=-1), "eval_every"),
]

IDENTITY_CASES = [
    _case("name-too-long", base_spec(name="n" * 129), "name", "at most 128 characters"),
    _case(
        "metadata-too-many-keys",
        base_spec(metadata={f"key{i}": "value" for i in range(17)}),
        "metadata",
        "at most 16 items",
    ),
    _case(
        "metadata-value-too-long",
        base_spec(metadata={"owner": "v" * 513}),
        "metadata.owner",
        "at most 512 characters",
    ),
    _case(
        "unknown-top-level-field",
        base_spec(learning_rate=0.1),
        "learning_rate",
        "Extra inputs are not permitted",
    ),
]

TRAINING_CASES = [
    _case("lr-zero", base_spec(optimizer={"lr": 0.0}), "optimizer.lr", "greater than 0"),
    _case("lr-negative", base_spec(optimizer={"lr": -0.1}), "optimizer.lr", "greater than 0"),
    _case("lr-above-max", base_spec(optimizer={"lr": 11.0}), "optimizer.lr"),
    _case("unknown-optimizer-type", base_spec(optimizer={"type": "adam"}), "optimizer.type"),
    _case("unknown-optimizer-field", base_spec(optimizer={"nesterov": True}), "optimizer.nesterov"),
    _case("momentum-one", base_spec(optimizer={"momentum": 1.0}), "optimizer.momentum"),
    _case("beta-one", base_spec(optimizer={"betas": [0.9, 1.0]}), "optimizer.betas.1"),
    _case("unknown-lr-schedule-type", base_spec(lr_schedule={"type": "step"}), "lr_schedule.type"),
    _case(
        "negative-warmup",
        base_spec(lr_schedule={"type": "linear", "warmup_steps": -1}),
        "lr_schedule.warmup_steps",
    ),
    _case("grad-clip-norm-zero", base_spec(grad_clip_norm=0.0), "grad_clip_norm", "greater than 0"),
    _case("grad-clip-norm-negative", base_spec(grad_clip_norm=-1.0), "grad_clip_norm"),
    _case("precision-not-in-enum", base_spec(precision="fp8"), "precision", "'fp32'"),
    _case("device-not-in-enum", base_spec(device="tpu"), "device", "'cuda'"),
    _case("seed-negative", base_spec(seed=-1), "seed", "greater than or equal to 0"),
    _case("seed-above-int32", base_spec(seed=2**31), "seed"),
]

NON_FINITE_CASES = [
    _case("nan-lr", base_spec(optimizer={"lr": float("nan")}), "optimizer.lr", "must be finite"),
    _case("inf-lr", base_spec(optimizer={"lr": float("inf")}), "optimizer.lr", "must be finite"),
    _case(
        "nan-beta",
        base_spec(optimizer={"betas": [0.9, float("nan")]}),
        "optimizer.betas.1",
        "must be finite",
    ),
    _case(
        "minus-inf-grad-clip-norm",
        base_spec(grad_clip_norm=float("-inf")),
        "grad_clip_norm",
        "must be finite",
    ),
    _case(
        "nan-dataset-noise",
        base_spec(dataset={"type": "synthetic-classification", "noise": float("nan")}),
        "dataset.noise",
        "must be finite",
    ),
    _case(
        "inf-hidden-size",
        base_spec(model={"type": "mlp", "hidden_sizes": [16, float("inf")]}),
        "model.hidden_sizes.1",
        "must be finite",
    ),
    _case("inf-max-steps", base_spec(max_steps=float("inf")), "max_steps", "must be finite"),
    _case("nan-string-lr", base_spec(optimizer={"lr": "NaN"}), "optimizer.lr"),
    _case("infinity-string-grad-clip-norm", base_spec(grad_clip_norm="Infinity"), "grad_clip_norm"),
]

MODEL_CASES = [
    _case(
        "tiny-gpt-heads-do-not-divide-width",
        gpt_spec({"n_embd": 10, "n_head": 3}),
        "model.n_embd",
        "multiple of n_head (3), not 10",
    ),
    _case(
        "tiny-text-min-length-above-max-length",
        gpt_spec(dataset={"type": "tiny-text", "min_length": 50, "max_length": 10}),
        "dataset.min_length",
        "must not exceed max_length (10), not 50",
    ),
    _case(
        "mlp-on-tiny-text",
        base_spec(dataset={"type": "tiny-text"}),
        "dataset.type",
        "model 'mlp' cannot train on 'tiny-text'",
        "use one of: digits, file, synthetic-classification",
    ),
    _case(
        "tiny-gpt-on-digits",
        gpt_spec(dataset={"type": "digits"}),
        "dataset.type",
        "model 'tiny-gpt' cannot train on 'digits'",
        "use one of: file, tiny-text",
    ),
    _case(
        "cnn-on-synthetic-classification",
        base_spec(model={"type": "cnn"}),
        "dataset.type",
        "model 'cnn' cannot train on 'synthetic-classification'",
        "use one of: digits, file",
    ),
    _case(
        "tiny-gpt-block-size-below-text-length",
        gpt_spec({"block_size": 32}, dataset={"type": "tiny-text", "max_length": 64}),
        "model.block_size",
        "at least dataset.max_length - 1 = 63",
    ),
    _case(
        "too-many-parameters",
        base_spec(
            model={"type": "mlp", "hidden_sizes": [8192] * 8},
            dataset={"type": "synthetic-classification", "n_features": 4096},
        ),
        "model",
        "parameters; the maximum is 200,000,000",
    ),
    _case(
        "micro-batch-activations-too-large",
        wide_gpt_spec(micro_batch_size=4096, accumulation_steps=1),
        "micro_batch_size",
        "a micro-batch of 4096",
        "at most 2 samples fit",
    ),
    _case(
        "derived-micro-batch-activations-too-large",
        wide_gpt_spec(micro_batch_size=REMOVE, accumulation_steps=2, batch_size=8),
        "micro_batch_size",
        "a micro-batch of 4",
    ),
    _case(
        "activation-checkpointing-on-an-mlp",
        base_spec(activation_checkpointing=True),
        "activation_checkpointing",
        "model 'mlp' cannot recompute its activations",
        "only hf-causal-lm, hf-sequence-classification, tiny-gpt can",
    ),
    _case(
        "activation-checkpointing-on-a-cnn",
        base_spec(model={"type": "cnn"}, dataset={"type": "digits"}, activation_checkpointing=True),
        "activation_checkpointing",
        "model 'cnn' cannot recompute its activations",
    ),
    _case(
        "packing-a-classifier",
        base_spec(
            model={"type": "hf-sequence-classification", "config": {"model_type": "bert"}},
            dataset={"type": "file", "file_id": FILE_ID, "packing": True},
        ),
        "dataset.packing",
        "needs a model that keeps packed rows apart (hf-causal-lm, tiny-gpt)",
        "not 'hf-sequence-classification'",
    ),
    _case(
        "packing-features",
        base_spec(dataset={"type": "file", "file_id": FILE_ID, "packing": True}),
        "dataset.packing",
        "not 'mlp'",
    ),
    _case(
        "packing-not-a-boolean",
        gpt_spec(dataset={"type": "file", "file_id": FILE_ID, "packing": "always"}),
        "dataset.packing",
    ),
    _case(
        "auto-micro-batch-activations-too-large",
        wide_gpt_spec(micro_batch_size="auto", accumulation_steps=REMOVE, batch_size=8),
        "batch_size",
        "a micro-batch of 8",
        "at most 2 samples fit",
    ),
]


@pytest.mark.parametrize(("data", "field", "fragments"), REGISTRY_CASES)
def test_registry_rule(data: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    assert_rejected(data, field, *fragments)


@pytest.mark.parametrize(("data", "field", "fragments"), BATCH_CASES)
def test_batch_rule(data: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    assert_rejected(data, field, *fragments)


@pytest.mark.parametrize(("data", "field", "fragments"), LENGTH_CASES)
def test_length_rule(data: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    assert_rejected(data, field, *fragments)


@pytest.mark.parametrize(("data", "field", "fragments"), IDENTITY_CASES)
def test_identity_rule(data: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    assert_rejected(data, field, *fragments)


@pytest.mark.parametrize(("data", "field", "fragments"), TRAINING_CASES)
def test_training_rule(data: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    assert_rejected(data, field, *fragments)


@pytest.mark.parametrize(("data", "field", "fragments"), NON_FINITE_CASES)
def test_non_finite_numbers_rule(
    data: dict[str, Any], field: str, fragments: tuple[str, ...]
) -> None:
    assert_rejected(data, field, *fragments)


@pytest.mark.parametrize(("data", "field", "fragments"), MODEL_CASES)
def test_model_rule(data: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    assert_rejected(data, field, *fragments)


def test_every_rule_gives_a_single_line() -> None:
    # One rule broken gives one line: no noise from rules that were not broken.
    for case in [
        *REGISTRY_CASES,
        *BATCH_CASES,
        *LENGTH_CASES,
        *IDENTITY_CASES,
        *TRAINING_CASES,
        *NON_FINITE_CASES,
        *MODEL_CASES,
    ]:
        data, field, _ = case.values
        lines = rejection(data)
        assert len(lines) == 1, (case.id, lines)
        assert lines[0].startswith(f"{field}: "), (case.id, lines)


def test_a_huge_transformer_is_refused_for_its_parameters_before_its_activations() -> None:
    # 24 layers of width 2048 hold about 1.2e9 parameters: the parameter bound fires
    # first, so the error names the model rather than the micro-batch.
    data = gpt_spec(
        {"n_layer": 24, "n_embd": 2048, "block_size": 2048},
        micro_batch_size=4096,
        accumulation_steps=1,
    )
    assert_rejected(data, "model", "1,213,321,216 parameters")


def test_several_bad_fields_give_one_line_each() -> None:
    lines = rejection(base_spec(precision="fp8", device="tpu", seed=-1))
    assert sorted(line.split(":")[0] for line in lines) == ["device", "precision", "seed"]


def test_messages_have_no_pydantic_value_error_prefix() -> None:
    (line,) = rejection(base_spec(optimizer={"lr": float("nan")}))
    assert line == "optimizer.lr: numbers must be finite"


def test_micro_batch_size_must_be_an_integer_or_auto() -> None:
    lines = rejection(base_spec(micro_batch_size="big"))
    assert lines and all(line.startswith("micro_batch_size") for line in lines)


# ---------------------------------------------------------------- good specs


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(
            {"micro_batch_size": 8, "accumulation_steps": 4}, (8, 4, 32), id="m-k-gives-batch"
        ),
        pytest.param({"micro_batch_size": 8, "batch_size": 32}, (8, 4, 32), id="m-b-gives-k"),
        pytest.param({"accumulation_steps": 4, "batch_size": 32}, (8, 4, 32), id="k-b-gives-m"),
        pytest.param(
            {"micro_batch_size": 8, "accumulation_steps": 4, "batch_size": 32},
            (8, 4, 32),
            id="consistent-triple",
        ),
        pytest.param(
            {"micro_batch_size": MAX_MICRO_BATCH_SIZE, "accumulation_steps": 16},
            (MAX_MICRO_BATCH_SIZE, 16, MAX_BATCH_SIZE),
            id="m-k-at-max-batch",
        ),
        pytest.param(
            {"accumulation_steps": 16, "batch_size": MAX_BATCH_SIZE},
            (MAX_MICRO_BATCH_SIZE, 16, MAX_BATCH_SIZE),
            id="k-b-at-max-micro",
        ),
        pytest.param(
            {"micro_batch_size": 16, "batch_size": MAX_BATCH_SIZE},
            (16, MAX_ACCUMULATION_STEPS, MAX_BATCH_SIZE),
            id="m-b-at-max-steps",
        ),
    ],
)
@pytest.mark.parametrize("construct", ["model_validate", "init"])
@pytest.mark.filterwarnings("error")
def test_third_batch_field_is_derived(
    given: dict[str, Any], expected: tuple[int, int, int], construct: str
) -> None:
    data = batch_spec(**given)
    spec = JobSpec.model_validate(data) if construct == "model_validate" else JobSpec(**data)
    assert (spec.micro_batch_size, spec.accumulation_steps, spec.batch_size) == expected
    assert spec.window_size == expected[2]
    assert {"micro_batch_size", "accumulation_steps", "batch_size"} <= spec.model_fields_set


@pytest.mark.parametrize("steps", [REMOVE, 1], ids=["steps-left-out", "steps-one"])
def test_auto_micro_batch_keeps_batch_size_and_starts_at_one_step(steps: Any) -> None:
    spec = JobSpec.model_validate(
        batch_spec(micro_batch_size="auto", batch_size=48, accumulation_steps=steps)
    )
    assert (spec.micro_batch_size, spec.accumulation_steps, spec.batch_size) == ("auto", 1, 48)


def test_auto_micro_batch_may_start_above_the_micro_batch_bound() -> None:
    # The worker halves an 'auto' micro-batch on out-of-memory; only memory bounds it.
    spec = JobSpec.model_validate(batch_spec(micro_batch_size="auto", batch_size=MAX_BATCH_SIZE))
    assert spec.batch_size == MAX_BATCH_SIZE


def test_defaults_are_filled() -> None:
    spec = JobSpec.model_validate(base_spec())
    assert spec.optimizer == OptimizerSpec()
    assert spec.optimizer.type == "sgd" and spec.optimizer.lr == 0.05
    assert spec.optimizer.betas == (0.9, 0.999)
    assert spec.lr_schedule == LrScheduleSpec(type="constant", warmup_steps=0)
    assert spec.precision == "fp32"
    assert spec.device == "auto"
    assert spec.seed == 0
    assert spec.name is None and spec.metadata is None
    assert spec.grad_clip_norm is None and spec.epochs is None
    assert spec.checkpoint_every == 0 and spec.eval_every == 0
    assert spec.activation_checkpointing is False
    assert spec.model == MlpSpec(hidden_sizes=[64], dropout=0.0)
    assert spec.dataset == SyntheticClassificationSpec()


@pytest.mark.parametrize(
    ("model", "dataset", "optimizer"),
    [
        ({"type": "mlp"}, {"type": "digits"}, ("sgd", 0.05)),
        ({"type": "cnn"}, {"type": "digits"}, ("sgd", 0.05)),
        ({"type": "tiny-gpt"}, {"type": "tiny-text"}, ("adamw", 1e-3)),
        (
            {"type": "hf-causal-lm", "config": {"model_type": "gpt2"}},
            {"type": "tiny-text"},
            ("adamw", 1e-3),
        ),
        ({"type": "hf-causal-lm", "pretrained": "gpt2"}, {"type": "tiny-text"}, ("adamw", 5e-5)),
        (
            {"type": "hf-sequence-classification", "pretrained": "org/bert"},
            {"type": "file", "file_id": FILE_ID},
            ("adamw", 5e-5),
        ),
    ],
    ids=["mlp", "cnn", "tiny-gpt", "hf-config", "hf-pretrained", "hf-classifier"],
)
def test_the_default_optimizer_is_the_one_the_model_is_usually_trained_with(
    model: dict[str, Any], dataset: dict[str, Any], optimizer: tuple[str, float]
) -> None:
    spec = JobSpec.model_validate(base_spec(model=model, dataset=dataset))
    assert (spec.optimizer.type, spec.optimizer.lr) == optimizer


@pytest.mark.parametrize(
    ("model", "given", "optimizer"),
    [
        ({"type": "mlp"}, {"type": "adamw"}, ("adamw", 1e-3)),
        ({"type": "tiny-gpt"}, {"type": "sgd"}, ("sgd", 0.05)),
        ({"type": "tiny-gpt"}, {"lr": 0.01, "weight_decay": 0.1}, ("adamw", 0.01)),
        ({"type": "hf-causal-lm", "pretrained": "gpt2"}, {"type": "sgd"}, ("sgd", 0.05)),
        ({"type": "hf-causal-lm", "pretrained": "gpt2"}, {"lr": 1e-4}, ("adamw", 1e-4)),
        ({"type": "mlp"}, {"type": "adamw8bit"}, ("adamw8bit", 1e-3)),
        (
            {"type": "hf-causal-lm", "pretrained": "gpt2"},
            {"type": "adamw8bit"},
            ("adamw8bit", 5e-5),
        ),
    ],
)
def test_an_optimizer_given_in_part_keeps_its_values_and_gets_its_type_s_lr(
    model: dict[str, Any], given: dict[str, Any], optimizer: tuple[str, float]
) -> None:
    dataset = {"type": "digits"} if model["type"] == "mlp" else {"type": "tiny-text"}
    spec = JobSpec.model_validate(base_spec(model=model, dataset=dataset, optimizer=given))
    assert (spec.optimizer.type, spec.optimizer.lr) == optimizer
    assert spec.optimizer.weight_decay == given.get("weight_decay", 0.0)


PRETRAINED_LM = {"type": "hf-causal-lm", "pretrained": "/models/llama"}
LORA = {"r": 8, "alpha": 16}


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("model_type", ["hf-causal-lm", "hf-sequence-classification"])
def test_quantize_is_accepted_on_a_pretrained_hugging_face_model(
    quantize: str, model_type: str
) -> None:
    model = {"type": model_type, "pretrained": "/models/llama"}
    dataset = (
        {"type": "tiny-text"}
        if model_type == "hf-causal-lm"
        else {"type": "file", "file_id": FILE_ID}
    )
    spec = JobSpec.model_validate(
        base_spec(model=model, dataset=dataset, quantize=quantize, lora=LORA)
    )
    assert spec.quantize == quantize
    assert JobSpec.model_validate(spec.model_dump(mode="json")).quantize == quantize


@pytest.mark.parametrize("model", [{"type": "tiny-gpt"}, {"type": "mlp"}])
def test_quantize_on_another_model_is_refused_naming_quantize(model: dict[str, Any]) -> None:
    dataset = {"type": "tiny-text"} if model["type"] == "tiny-gpt" else {"type": "digits"}
    assert_rejected(
        base_spec(model=model, dataset=dataset, quantize="nf4"),
        "quantize",
        "needs a Hugging Face model",
        repr(model["type"]),
    )


def test_quantize_of_a_model_from_a_config_is_refused_a_frozen_random_base_stays_random() -> None:
    model = {"type": "hf-causal-lm", "config": {"model_type": "llama"}}
    assert_rejected(
        base_spec(model=model, dataset={"type": "tiny-text"}, quantize="int8"),
        "quantize",
        "needs model.pretrained",
    )


def test_quantize_without_lora_is_refused_naming_lora_a_quantized_base_is_frozen() -> None:
    assert_rejected(
        base_spec(model=PRETRAINED_LM, dataset={"type": "tiny-text"}, quantize="nf4"),
        "lora",
        "required with quantize",
    )


def test_an_unknown_quantization_is_refused() -> None:
    spec = base_spec(model=PRETRAINED_LM, dataset={"type": "tiny-text"}, quantize="fp4")
    assert_rejected(spec, "quantize", "'nf4' or 'int8'")


@pytest.mark.parametrize(
    ("cuda_only", "named"),
    [
        ({"quantize": "nf4", "lora": LORA}, "quantize 'nf4'"),
        ({"optimizer": {"type": "adamw8bit"}}, "optimizer.type 'adamw8bit'"),
    ],
)
def test_the_cuda_only_options_refuse_fp64_and_the_cpu_device(
    cuda_only: dict[str, Any], named: str
) -> None:
    spec = base_spec(model=PRETRAINED_LM, dataset={"type": "tiny-text"}, **cuda_only)
    assert JobSpec.model_validate(spec)
    assert_rejected({**spec, "precision": "fp64"}, "precision", named, "bitsandbytes")
    assert_rejected({**spec, "device": "cpu"}, "device", named, "needs a CUDA device")
    # Whether the worker has CUDA is the worker's to say: "auto" and "cuda" are accepted.
    assert JobSpec.model_validate({**spec, "device": "cuda", "precision": "bf16"})


def test_an_optimizer_type_that_is_no_string_is_a_validation_error_not_a_crash() -> None:
    assert_rejected(gpt_spec(optimizer={"type": ["adamw8bit"]}), "optimizer.type")


def test_a_file_dataset_holds_out_a_tenth_unless_it_has_a_validation_file() -> None:
    def dataset_of(**fields: Any) -> Any:
        spec = gpt_spec(dataset={"type": "file", "file_id": FILE_ID, **fields})
        return JobSpec.model_validate(spec).dataset

    assert dataset_of().eval_fraction == 0.1
    assert dataset_of(validation_file_id=VALIDATION_ID).eval_fraction == 0.0
    assert dataset_of(eval_fraction=0).eval_fraction == 0.0
    # So evaluating a file needs nothing more than eval_every.
    assert JobSpec.model_validate(
        gpt_spec(dataset={"type": "file", "file_id": FILE_ID}, eval_every=5)
    )


def test_a_stored_spec_keeps_the_defaults_it_was_stored_with() -> None:
    """A job stores its spec with every value spelled out: one stored before the defaults
    changed (tiny-gpt with SGD at 0.05, a file with nothing held out) resumes as it was."""
    spec = JobSpec.model_validate(gpt_spec(dataset={"type": "file", "file_id": FILE_ID}))
    stored = spec.model_dump(mode="json")
    stored["optimizer"] = {**stored["optimizer"], "type": "sgd", "lr": 0.05}
    stored["dataset"] = {**stored["dataset"], "eval_fraction": 0.0}
    again = JobSpec.model_validate(stored)
    assert (again.optimizer.type, again.optimizer.lr, again.dataset.eval_fraction) == (
        "sgd",
        0.05,
        0.0,
    )
    assert again.model_dump(mode="json") == stored
    # And a stored spec of today's defaults validates to itself too.
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("model", "dataset", "model_class", "dataset_class"),
    [
        pytest.param("mlp", "synthetic-classification", MlpSpec, SyntheticClassificationSpec),
        pytest.param("mlp", "digits", MlpSpec, DigitsSpec),
        pytest.param("cnn", "digits", CnnSpec, DigitsSpec),
        pytest.param("tiny-gpt", "tiny-text", TinyGptSpec, TinyTextSpec),
    ],
)
def test_every_fitting_builtin_pair_is_accepted(
    model: str, dataset: str, model_class: type, dataset_class: type
) -> None:
    spec = JobSpec.model_validate(base_spec(model={"type": model}, dataset={"type": dataset}))
    assert isinstance(spec.model, model_class)
    assert isinstance(spec.dataset, dataset_class)


def test_block_size_of_exactly_max_length_minus_one_is_enough() -> None:
    spec = JobSpec.model_validate(
        gpt_spec({"block_size": 63}, dataset={"type": "tiny-text", "max_length": 64})
    )
    assert isinstance(spec.model, TinyGptSpec) and spec.model.block_size == 63


def test_largest_micro_batch_that_fits_is_accepted() -> None:
    spec = JobSpec.model_validate(wide_gpt_spec(micro_batch_size=2, accumulation_steps=4))
    per_sample = estimate_activation_elements_per_sample(spec)
    assert per_sample is not None
    assert 2 * per_sample <= spec_module.MAX_ACTIVATION_ELEMENTS < 3 * per_sample
    parameters = estimate_parameters(spec)
    assert parameters is not None and parameters <= spec_module.MAX_PARAMETERS


@pytest.mark.parametrize(
    "model",
    [
        {"type": "tiny-gpt"},
        {"type": "hf-causal-lm", "config": {"model_type": "llama"}},
        {"type": "hf-sequence-classification", "pretrained": "org/bert"},
    ],
    ids=["tiny-gpt", "hf-causal-lm", "hf-sequence-classification"],
)
def test_activation_checkpointing_is_accepted_for_models_made_of_blocks(
    model: dict[str, Any],
) -> None:
    dataset = {"type": "file", "file_id": FILE_ID} if "sequence" in model["type"] else None
    data = gpt_spec(activation_checkpointing=True) | {"model": model}
    spec = JobSpec.model_validate(data | ({"dataset": dataset} if dataset else {}))
    assert spec.activation_checkpointing is True


def test_activation_checkpointing_lets_more_samples_fit_one_micro_batch() -> None:
    # Each block keeps only its input, and one block at a time all of its activations.
    plain = JobSpec.model_validate(wide_gpt_spec(micro_batch_size=2, accumulation_steps=1))
    data = wide_gpt_spec(micro_batch_size=16, accumulation_steps=1, activation_checkpointing=True)
    checkpointed = JobSpec.model_validate(data)
    plain_elements = estimate_activation_elements_per_sample(plain)
    checkpointed_elements = estimate_activation_elements_per_sample(checkpointed)
    assert plain_elements and checkpointed_elements
    assert checkpointed_elements < plain_elements / 8
    assert_rejected(
        wide_gpt_spec(micro_batch_size=4096, accumulation_steps=1, activation_checkpointing=True),
        "micro_batch_size",
        "a micro-batch of 4096",
    )


def full_spec() -> dict[str, Any]:
    """Every field set to a non-default value."""
    return {
        "name": "shakespeare-chars",
        "metadata": {"owner": "ada", "ticket": "ML-42"},
        "model": {
            "type": "tiny-gpt",
            "n_layer": 3,
            "n_head": 4,
            "n_embd": 96,
            "block_size": 200,
            "dropout": 0.1,
        },
        "dataset": {
            "type": "tiny-text",
            "min_length": 16,
            "max_length": 128,
            "eval_fraction": 0.2,
        },
        "micro_batch_size": 6,
        "accumulation_steps": 5,
        "batch_size": 120,
        "epochs": 7,
        "optimizer": {
            "type": "adamw",
            "lr": 0.003,
            "momentum": 0.5,
            "weight_decay": 0.01,
            "betas": [0.8, 0.95],
        },
        "lora": {"r": 4, "alpha": 32.0, "dropout": 0.05, "target_modules": ["qkv"]},
        "lr_schedule": {"type": "cosine", "warmup_steps": 20},
        "grad_clip_norm": 1.5,
        "precision": "bf16",
        # Needs a pretrained hf-* model: its round trip is test_quantize_is_accepted_….
        "quantize": None,
        "seed": 1234,
        "device": "cuda",
        "devices": 2,
        "nodes": 2,
        "elastic": {"min_nodes": 1},
        "checkpoint_every": 50,
        "eval_every": 25,
        "keep_checkpoints": {"last": 3, "best": 2},
        "max_attempts": 5,
        "max_runtime_seconds": 3600,
        "priority": 700,
        "preemptible": False,
        "activation_checkpointing": True,
        "tracking": {"mlflow": {"experiment": "shakespeare", "run_name": "chars-3x96"}},
    }


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(full_spec(), id="full"),
        pytest.param(base_spec(), id="derived-batch-size"),
        pytest.param(
            batch_spec(micro_batch_size="auto", batch_size=16, max_steps=3), id="auto-micro-batch"
        ),
        pytest.param(base_spec(model={"type": "cnn"}, dataset={"type": "digits"}), id="cnn"),
    ],
)
def test_spec_round_trips_through_json(data: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(data)
    dumped = spec.model_dump(mode="json")
    again = JobSpec.model_validate(json.loads(json.dumps(dumped)))
    assert again == spec
    assert again.model_dump(mode="json") == dumped


def test_full_spec_keeps_every_given_value() -> None:
    data = full_spec()
    assert JobSpec.model_validate(data).model_dump(mode="json") == {**data, "max_steps": None}


@pytest.mark.parametrize("model", ["tiny-gpt", "hf-causal-lm", "hf-sequence-classification"])
def test_lora_goes_on_tiny_gpt_and_transformers_models_with_its_defaults(model: str) -> None:
    extra = {"config": {"model_type": "llama"}} if model.startswith("hf-") else {}
    data = gpt_spec(lora={}) | {"model": {"type": model, **extra}}
    if model == "hf-sequence-classification":
        data["dataset"] = {"type": "file", "file_id": "file_" + "0" * 24}
    lora = JobSpec.model_validate(data).lora
    assert lora is not None
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 16.0, 0.0, None)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_lora_on_a_model_without_adapters_is_refused_naming_those_with(model: str) -> None:
    errors = rejection(base_spec(model={"type": model}, dataset={"type": "digits"}, lora={}))
    assert errors == [
        "lora: LoRA adapters go on hf-causal-lm, hf-sequence-classification, tiny-gpt; "
        f"not on model {model!r}"
    ]


@pytest.mark.parametrize(
    ("lora", "field"),
    [({"r": 0}, "lora.r"), ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
     ({"target_modules": []}, "lora.target_modules"), ({"rank": 8}, "lora.rank")],
)  # fmt: skip
def test_lora_fields_are_bounded(lora: dict[str, Any], field: str) -> None:
    errors = rejection(gpt_spec(lora=lora))
    assert len(errors) == 1 and errors[0].startswith(f"{field}: ")


def test_spec_is_frozen() -> None:
    spec = JobSpec.model_validate(base_spec())
    with pytest.raises(ValidationError) as caught:
        spec.seed = 3  # type: ignore[misc]
    assert validation_messages(caught.value) == ["seed: Instance is frozen"]


def test_already_built_model_and_dataset_are_accepted() -> None:
    spec = JobSpec.model_validate(base_spec(model=MlpSpec(hidden_sizes=[8]), dataset=DigitsSpec()))
    assert spec.model == MlpSpec(hidden_sizes=[8])
    assert spec.dataset == DigitsSpec()


def test_spec_module_does_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import app.jobs.spec, sys; assert 'torch' not in sys.modules"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- plugin registry


@pytest.fixture
def my_model_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model named 'my-model' registered under trainjob.models; no dataset plugins."""

    def fake_plugin_names(group: str) -> frozenset[str]:
        return frozenset({"my-model"}) if group == MODEL_ENTRY_POINT_GROUP else frozenset()

    monkeypatch.setattr(spec_module, "plugin_names", fake_plugin_names)


def test_plugin_names_is_cached() -> None:
    assert hasattr(plugin_names, "cache_info") and hasattr(plugin_names, "cache_clear")
    first = plugin_names(MODEL_ENTRY_POINT_GROUP)
    assert isinstance(first, frozenset)
    hits = plugin_names.cache_info().hits
    assert plugin_names(MODEL_ENTRY_POINT_GROUP) is first
    assert plugin_names.cache_info().hits == hits + 1


def test_known_types_are_builtins_plus_installed_plugins() -> None:
    models, datasets = known_types("model"), known_types("dataset")
    builtin_models = {"cnn", "mlp", "tiny-gpt", "hf-causal-lm", "hf-sequence-classification"}
    builtin_datasets = {"digits", "synthetic-classification", "tiny-text", "file"}
    assert builtin_models <= set(models) and models == sorted(models)
    assert builtin_datasets <= set(datasets)
    assert set(models) - builtin_models == plugin_names(MODEL_ENTRY_POINT_GROUP)
    assert set(datasets) - builtin_datasets == plugin_names(DATASET_ENTRY_POINT_GROUP)


@pytest.mark.usefixtures("my_model_plugin")
def test_registered_plugin_model_is_accepted() -> None:
    spec = JobSpec.model_validate(base_spec(model={"type": "my-model", "width": 3, "depth": 2}))
    assert isinstance(spec.model, PluginModelSpec)
    assert spec.model.type == "my-model"
    assert spec.model.model_extra == {"width": 3, "depth": 2}
    # The plugin's parameters are the worker's business: no estimate, no bound here.
    assert estimate_parameters(spec) is None
    assert estimate_activation_elements_per_sample(spec) is None
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.usefixtures("my_model_plugin")
def test_a_plugin_model_cannot_ask_the_engine_to_checkpoint_it() -> None:
    # The engine does not know a plugin's blocks: the plugin checkpoints inside itself.
    data = base_spec(model={"type": "my-model"}, activation_checkpointing=True)
    assert_rejected(
        data, "activation_checkpointing", "model 'my-model' cannot recompute", "plugin model"
    )


@pytest.mark.usefixtures("my_model_plugin")
def test_registered_plugin_model_is_listed_among_known_models() -> None:
    assert known_types("model") == [
        "cnn",
        "hf-causal-lm",
        "hf-sequence-classification",
        "mlp",
        "my-model",
        "tiny-gpt",
    ]
    assert_rejected(
        base_spec(model={"type": "resnet"}),
        "model",
        "known: cnn, hf-causal-lm, hf-sequence-classification, mlp, my-model, tiny-gpt",
    )


@pytest.mark.usefixtures("my_model_plugin")
def test_plugin_model_name_is_not_a_dataset() -> None:
    assert_rejected(
        base_spec(dataset={"type": "my-model"}),
        "dataset",
        "unknown dataset type 'my-model'",
        "known: digits, file, synthetic-classification, tiny-text",
    )


@pytest.mark.usefixtures("my_model_plugin")
def test_non_finite_numbers_are_refused_in_plugin_parameters() -> None:
    assert_rejected(
        base_spec(model={"type": "my-model", "scale": float("nan")}),
        "model.scale",
        "must be finite",
    )


def test_unregistered_plugin_model_is_refused() -> None:
    assert_rejected(base_spec(model={"type": "my-model"}), "model", "unknown model type")


def test_registered_plugin_dataset_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_plugin_names(group: str) -> frozenset[str]:
        return frozenset({"my-data"}) if group == DATASET_ENTRY_POINT_GROUP else frozenset()

    monkeypatch.setattr(spec_module, "plugin_names", fake_plugin_names)
    spec = JobSpec.model_validate(base_spec(dataset={"type": "my-data", "rows": 10}))
    assert isinstance(spec.dataset, PluginDatasetSpec)
    assert spec.dataset.model_extra == {"rows": 10}


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize(
    ("given", "derived"),
    [
        ({"micro_batch_size": 2, "accumulation_steps": 3}, (2, 3, 12)),
        ({"micro_batch_size": 2, "batch_size": 12}, (2, 3, 12)),
        ({"accumulation_steps": 3, "batch_size": 12}, (2, 3, 12)),
        ({"micro_batch_size": "auto", "batch_size": 12}, ("auto", 1, 12)),
    ],
)
def test_the_batch_is_micro_batch_times_steps_times_devices(
    given: dict[str, Any], derived: tuple[Any, int, int]
) -> None:
    unset = {"micro_batch_size": REMOVE, "accumulation_steps": REMOVE}
    spec = JobSpec.model_validate(base_spec(**{**unset, **given}, devices=2))
    assert (spec.micro_batch_size, spec.accumulation_steps, spec.batch_size) == derived
    assert spec.window_size == 12 and spec.devices == 2


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"micro_batch_size": 2, "accumulation_steps": 3, "batch_size": 6},
            "batch_size: must equal micro_batch_size × accumulation_steps × devices = 12, not 6",
        ),
        (
            {"micro_batch_size": 4, "batch_size": 12},
            "batch_size: must be a multiple of micro_batch_size × devices (8), not 12",
        ),
        (
            {"accumulation_steps": 5, "batch_size": 12},
            "batch_size: must be a multiple of accumulation_steps × devices (10), not 12",
        ),
        (
            {"micro_batch_size": "auto", "batch_size": 7},
            "batch_size: must be a multiple of devices (2), not 7",
        ),
        (
            {"micro_batch_size": 1, "batch_size": 2 * 4096 + 2},
            "accumulation_steps: batch_size / (micro_batch_size × devices) = 4097 exceeds the "
            "maximum of 4096",
        ),
    ],
)
def test_devices_that_do_not_multiply_into_the_batch_name_the_field(
    given: dict[str, Any], message: str
) -> None:
    data = {**base_spec(), "micro_batch_size": None, "accumulation_steps": None, "batch_size": None}
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({**data, **given, "devices": 2})
    assert validation_messages(caught.value) == [message]


@pytest.mark.parametrize("devices", [0, 65])
def test_devices_are_between_1_and_64(devices: int) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(base_spec(devices=devices))
    assert validation_messages(caught.value)[0].startswith("devices: ")


# ---------------------------------------------------------------- nodes


def test_the_batch_is_micro_batch_times_steps_times_devices_times_nodes() -> None:
    given = {"micro_batch_size": 2, "accumulation_steps": 3}
    spec = JobSpec.model_validate(base_spec(**given, devices=2, nodes=3))
    assert (spec.batch_size, spec.window_size, spec.processes, spec.min_nodes) == (36, 36, 6, 3)
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(base_spec(**given, batch_size=12, devices=2, nodes=3))
    assert validation_messages(caught.value) == [
        "batch_size: must equal micro_batch_size × accumulation_steps × devices × nodes = 36, "
        "not 12"
    ]
    auto = base_spec(micro_batch_size="auto", accumulation_steps=REMOVE, batch_size=7, nodes=2)
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(auto)
    assert validation_messages(caught.value) == [
        "batch_size: must be a multiple of devices × nodes (2), not 7"
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nodes": 0}, "nodes: "),
        ({"nodes": 17}, "nodes: "),
        ({"nodes": 2, "elastic": {"min_nodes": 3}}, "elastic.min_nodes: must be at most nodes (2)"),
        ({"nodes": 2, "elastic": {"min_nodes": 0}}, "elastic.min_nodes: "),
    ],
)
def test_nodes_and_elastic_min_nodes_are_bounded(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(base_spec(**changes))
    assert validation_messages(caught.value)[0].startswith(message)


def test_an_elastic_job_may_run_on_as_few_as_min_nodes() -> None:
    spec = JobSpec.model_validate(base_spec(nodes=4, elastic={"min_nodes": 2}))
    assert (spec.nodes, spec.min_nodes) == (4, 2)
