"""A spec as MLflow params: flat dotted keys, within MLflow's key and value limits."""

from __future__ import annotations

from app.jobs.spec import JobSpec
from worker.engine.trainer import _training_fields
from worker.tracking.params import MAX_KEY_LENGTH, MAX_VALUE_LENGTH, flatten, spec_params


def test_nested_objects_become_dotted_keys_and_other_values_json() -> None:
    assert flatten({"model": {"type": "mlp", "hidden_sizes": [64, 32], "dropout": 0.0}}) == {
        "model.type": "mlp",
        "model.hidden_sizes": "[64, 32]",
        "model.dropout": "0.0",
    }
    assert flatten({"lora": None, "elastic": {}, "preemptible": True}) == {
        "lora": "null",
        "elastic": "{}",
        "preemptible": "true",
    }


SPEC = {
    "model": {"type": "mlp", "hidden_sizes": [16]},
    "dataset": {"type": "digits"},
    "micro_batch_size": 8,
    "accumulation_steps": 2,
    "max_steps": 3,
}


def test_a_stored_spec_gives_every_field_but_tracking_with_derived_values() -> None:
    spec = JobSpec.model_validate(SPEC | {"tracking": {"mlflow": {"experiment": "e"}}})
    params = spec_params(spec.model_dump(mode="json"))
    assert params["batch_size"] == "16"  # derived
    assert params["model.type"] == "mlp"
    assert params["optimizer.lr"] == "0.05"
    assert params["lr_schedule.type"] == "constant"
    assert not any(key.startswith("tracking") for key in params)


def test_user_keys_and_long_values_are_made_acceptable_to_mlflow() -> None:
    long_key = "k" * 300
    params = spec_params(
        {"metadata": {"team/a:b é": "x", long_key: "y", "v": "z" * 7000}, "name": "n"}
    )
    assert params["metadata.team_a_b _"] == "x"
    assert f"metadata.{long_key}"[:MAX_KEY_LENGTH] in params
    assert all(len(key) <= MAX_KEY_LENGTH for key in params)
    value = params["metadata.v"]
    assert len(value) == MAX_VALUE_LENGTH and value.endswith("…(cut)")


def test_keys_that_collide_once_replaced_keep_the_first_value() -> None:
    assert spec_params({"metadata": {"a/b": "first", "a:b": "second"}}) == {"metadata.a_b": "first"}


def test_tracking_is_no_training_field_a_checkpoint_compares() -> None:
    """A checkpoint resumes only the same training (worker/engine/trainer.py): a job
    resumed with another tracking section, or none, is the same training."""
    untracked = JobSpec.model_validate(SPEC)
    tracked = JobSpec.model_validate(SPEC | {"tracking": {"mlflow": {"experiment": "e"}}})
    assert _training_fields(tracked) == _training_fields(untracked)
