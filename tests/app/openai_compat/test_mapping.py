"""The OpenAI ↔ native mapping, field by field and refusal by refusal (no database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from app.jobs.schemas import JobPublic
from app.jobs.spec import FINE_TUNING_LR, JobSpec
from app.openai_compat import mapping
from app.openai_compat.exceptions import Unsupported
from app.openai_compat.schemas import FineTuningJobCreate

FILE = "file_" + "a" * 24
VALIDATION = "file_" + "b" * 24
JOB = "job_" + "c" * 24


def native(**body: Any) -> dict[str, Any]:
    return mapping.native_spec(
        FineTuningJobCreate(**({"model": "org/tiny", "training_file": FILE} | body))
    )


def test_a_minimal_request_is_a_pretrained_causal_lm_on_the_file_with_the_auto_values() -> None:
    spec = native()
    assert spec["model"] == {"type": "hf-causal-lm", "pretrained": "org/tiny"}
    assert spec["dataset"] == {
        "type": "file",
        "file_id": FILE,
        "tokenizer": "model",
        "eval_fraction": 0.0,
    }
    assert spec["batch_size"] == mapping.AUTO_BATCH_SIZE and spec["micro_batch_size"] == "auto"
    assert spec["epochs"] == mapping.AUTO_N_EPOCHS
    assert spec["optimizer"] == {"type": "adamw", "lr": FINE_TUNING_LR}
    assert "eval_every" not in spec and "seed" not in spec
    JobSpec.model_validate(spec)  # a valid native spec


@pytest.mark.parametrize("where", ["top", "method"])
def test_each_hyperparameter_maps_to_its_native_field(where: str) -> None:
    values = {"batch_size": 16, "n_epochs": 2, "learning_rate_multiplier": 0.5}
    body: dict[str, Any] = (
        {"hyperparameters": values}
        if where == "top"
        else {"method": {"type": "supervised", "supervised": {"hyperparameters": values}}}
    )
    spec = native(**body)
    assert (spec["batch_size"], spec["epochs"]) == (16, 2)
    assert spec["optimizer"]["lr"] == 0.5 * mapping.BASE_LEARNING_RATE


def test_auto_hyperparameters_are_the_documented_defaults() -> None:
    auto = {"batch_size": "auto", "n_epochs": "auto", "learning_rate_multiplier": "auto"}
    assert native(hyperparameters=auto) == native()


def test_seed_suffix_metadata_and_validation_file_map_to_native_fields() -> None:
    spec = native(seed=9, suffix="mine", metadata={"team": "nlp"}, validation_file=VALIDATION)
    assert (spec["seed"], spec["name"], spec["metadata"]) == (9, "mine", {"team": "nlp"})
    assert spec["dataset"]["validation_file_id"] == VALIDATION
    assert "eval_fraction" not in spec["dataset"]  # the native default with a validation file
    assert spec["eval_every"] == mapping.EVAL_EVERY_STEPS


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"method": {"type": "dpo"}}, "method.type", "DPO is not supported"),
        ({"method": {"type": "reinforcement"}}, "method.type", "reinforcement fine-tuning"),
        (
            {"method": {"type": "supervised", "dpo": {}}},
            "method.dpo",
            "only with method.type 'dpo'",
        ),
        (
            {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
            "integrations",
            "`tracking` field",
        ),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
            "give the hyperparameters once",
        ),
    ],
)
def test_what_is_not_supported_is_refused_naming_the_field(
    body: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(Unsupported) as refused:
        native(**body)
    assert refused.value.status_code == 422 and refused.value.details["param"] == param
    assert refused.value.message.startswith(f"{param}: ") and message in refused.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "training_file": FILE, "unknown": 1},
        {"model": "m", "training_file": FILE, "hyperparameters": {"batch_size": 0}},
        {"model": "m", "training_file": FILE, "hyperparameters": {"warmup": 3}},
        {"model": "m", "training_file": FILE, "method": {"type": "unsupervised"}},
        {"model": "m", "training_file": FILE, "suffix": "x" * 65},
    ],
)
def test_unknown_fields_and_bad_values_fail_validation(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FineTuningJobCreate(**body)


@pytest.mark.parametrize(
    ("native_path", "at", "param"),
    [
        ("batch_size", "hyperparameters", "hyperparameters.batch_size"),
        (
            "epochs",
            "method.supervised.hyperparameters",
            "method.supervised.hyperparameters.n_epochs",
        ),
        ("optimizer.lr", "hyperparameters", "hyperparameters.learning_rate_multiplier"),
        ("model.pretrained", "hyperparameters", "model"),
        ("dataset.file_id", "hyperparameters", "training_file"),
        ("dataset.validation_file_id", "hyperparameters", "validation_file"),
        ("name", "hyperparameters", "suffix"),
        ("metadata.team", "hyperparameters", "metadata.team"),
        ("micro_batch_size", "hyperparameters", None),
    ],
)
def test_a_native_error_path_names_the_openai_field(
    native_path: str, at: str, param: str | None
) -> None:
    assert mapping.openai_param(native_path, hyperparameters_at=at) == param


def job(**changes: Any) -> JobPublic:
    spec = JobSpec.model_validate(native(seed=4, suffix="s", metadata={"k": "v"})).model_dump(
        mode="json"
    )
    row: dict[str, Any] = {
        "id": JOB, "name": "s", "tenant": "acme", "status": "running", "spec": spec,
        "batch_size": 8, "micro_batch_size": 8, "accumulation_steps": 1, "devices": 1,
        "nodes": 1, "priority": 500, "preemptible": True,
        "progress": {"step": 1, "max_steps": 2, "epoch": 0, "samples_seen": 8, "tokens_seen": 99},
        "metrics": None, "error": None, "attempts": 1, "max_attempts": 3, "worker": "w",
        "runtime_seconds": 1.0, "cancel_requested": False,
        "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "started_at": None,
        "finished_at": None,
    }  # fmt: skip
    return JobPublic.model_validate(row | changes)


def test_a_job_renders_every_field_the_client_reads() -> None:
    finish = datetime(2026, 1, 2, 4, 0, 0, tzinfo=UTC)
    rendered = mapping.render_job(job(estimated_finish=finish))
    assert rendered.object == "fine_tuning.job" and rendered.id == JOB
    assert rendered.created_at == int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert rendered.estimated_finish == int(finish.timestamp()) and rendered.finished_at is None
    assert (rendered.model, rendered.organization_id, rendered.seed) == ("org/tiny", "acme", 4)
    assert (rendered.training_file, rendered.validation_file) == (FILE, None)
    assert rendered.hyperparameters.model_dump() == {
        "batch_size": 8,
        "n_epochs": mapping.AUTO_N_EPOCHS,
        "learning_rate_multiplier": 1.0,
    }
    assert rendered.method.type == "supervised" and rendered.metadata == {"k": "v"}
    assert rendered.status == "running" and rendered.error is None
    # Null until the job ends, as OpenAI's.
    assert rendered.fine_tuned_model is None and rendered.trained_tokens is None


def test_a_succeeded_job_has_its_model_name_and_trained_tokens() -> None:
    rendered = mapping.render_job(job(status="succeeded"))
    assert rendered.fine_tuned_model == f"ft:org/tiny:acme:s:{JOB}"
    assert rendered.trained_tokens == 99


def test_a_failed_job_s_error_is_openai_s_code_and_message() -> None:
    rendered = mapping.render_job(
        job(status="failed", error={"type": "nan_loss", "message": "NaN"})
    )
    assert rendered.error is not None
    assert rendered.error.model_dump() == {"code": "nan_loss", "message": "NaN", "param": None}


@pytest.mark.parametrize(
    ("status", "waiting", "expected"),
    [
        ("queued", False, "queued"),
        ("queued", True, "validating_files"),
        ("running", False, "running"),
        ("pausing", False, "running"),
        ("cancelling", False, "running"),
        ("paused", False, "paused"),
        ("succeeded", False, "succeeded"),
        ("failed", False, "failed"),
        ("cancelled", False, "cancelled"),
    ],
)
def test_every_native_status_has_an_openai_one(status: str, waiting: bool, expected: str) -> None:
    assert mapping.openai_status(status, waiting_for_files=waiting) == expected


def test_a_native_job_of_any_model_renders_with_its_type_as_model() -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"type": "mlp"},
            "dataset": {"type": "digits"},
            "batch_size": 8,
            "micro_batch_size": 8,
            "max_steps": 3,
        }
    ).model_dump(mode="json")
    rendered = mapping.render_job(job(spec=spec))
    assert (rendered.model, rendered.training_file, rendered.hyperparameters.n_epochs) == (
        "mlp",
        None,
        None,
    )


def test_model_names_parse_back_to_their_job_and_step() -> None:
    base = f"ft:/models/with:colon:acme:s:{JOB}"
    assert mapping.parse_model_name(base) == (JOB, None)
    assert mapping.parse_model_name(mapping.checkpoint_model_name(base, 12)) == (JOB, 12)
    with pytest.raises(ValueError, match="starts with 'ft:'"):
        mapping.parse_model_name(JOB)


def test_events_map_levels_types_and_messages() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    metrics = mapping.render_event(
        native_id=7, type="metrics", data={"step": 2, "loss": 1.5, "eval_loss": 1.2}, created_at=at
    )
    assert (metrics.id, metrics.type, metrics.level) == ("ftevent-7", "metrics", "info")
    assert metrics.data["train_loss"] == 1.5 and metrics.data["valid_loss"] == 1.2
    assert metrics.message == "Step 2: training loss=1.5"
    status = mapping.render_event(
        native_id=1, type="status", data={"status": "queued"}, created_at=at
    )
    assert (status.type, status.message) == ("message", "Job queued")
    warning = mapping.render_event(
        native_id=2, type="warning", data={"message": "hm"}, created_at=at
    )
    assert (warning.level, warning.message) == ("warn", "hm")
    error = mapping.render_event(
        native_id=3, type="error", data={"type": "oom", "message": "too big"}, created_at=at
    )
    assert (error.level, error.message) == ("error", "oom: too big")
    other = mapping.render_event(native_id=4, type="preempting", data={"by": "x"}, created_at=at)
    assert (other.level, other.message) == ("info", 'preempting: {"by": "x"}')
    assert mapping.EVENT_ID.match(other.id)


def test_a_checkpoint_renders_with_its_model_name_and_metrics() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    rendered = mapping.render_checkpoint(
        job_id=JOB, model_name="ft:m:t::" + JOB, step=3, loss=0.5, eval_loss=None, created_at=at
    )
    assert rendered.id == f"ftckpt-{JOB}-step-3" and mapping.CHECKPOINT_ID.match(rendered.id)
    assert rendered.fine_tuned_model_checkpoint == f"ft:m:t::{JOB}:ckpt-step-3"
    assert (rendered.step_number, rendered.metrics.train_loss, rendered.metrics.valid_loss) == (
        3,
        0.5,
        None,
    )
