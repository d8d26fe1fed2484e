"""Submitting a job on uploaded files: the files must be the tenant's, valid or still
validating, of the spec's format, and of a kind the model trains on; a job on a file
still validating is stored but not sent."""

from __future__ import annotations

import json
from typing import Any

import redis
from fastapi.testclient import TestClient

from app.db import Database
from app.settings import Settings
from tests.app.files.stored_files import (
    CLASSIFICATION_STATS,
    IMAGE_STATS,
    add_file,
    load_job,
    text_job_spec,
    valid_text_file,
)


def refused(client: TestClient, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "validation_error"
    return error


def paths(error: dict[str, Any]) -> list[str]:
    return [field["path"] for field in error["fields"]]


def messages_in(redis_client: redis.Redis, settings: Settings) -> list[str]:
    raw: list[bytes] = redis_client.lrange(settings.queue, 0, -1)  # type: ignore[assignment]
    return [json.loads(message)["headers"]["argsrepr"] for message in raw]


def test_a_job_on_a_valid_file_is_sent_at_once(
    client: TestClient, database: Database, settings: Settings, redis_client: redis.Redis
) -> None:
    train, held_out = valid_text_file(database), valid_text_file(database)
    response = client.post("/v1/jobs", json=text_job_spec(train, validation_file_id=held_out))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert repr([job["id"]]) in messages_in(redis_client, settings)


def test_a_job_on_a_validating_file_is_queued_but_not_sent(
    client: TestClient, database: Database, settings: Settings, redis_client: redis.Redis
) -> None:
    train = add_file(database)
    response = client.post("/v1/jobs", json=text_job_spec(train))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["error"] is None
    assert repr([job["id"]]) not in messages_in(redis_client, settings)
    assert load_job(database, job["id"]).enqueued_at is None  # the validation sends it


def test_an_unknown_file_or_another_tenants_is_422_naming_the_field(
    client: TestClient, database: Database
) -> None:
    unknown = "file_000000000000000000000000"
    error = refused(client, text_job_spec(unknown))
    assert paths(error) == ["dataset.file_id"]
    assert error["fields"][0]["message"] == f"no file {unknown!r}"

    theirs = valid_text_file(database, tenant="someone-else")
    mine = valid_text_file(database)
    error = refused(client, text_job_spec(mine, validation_file_id=theirs))
    assert paths(error) == ["dataset.validation_file_id"]
    assert error["fields"][0]["message"] == f"no file {theirs!r}"  # as if it did not exist


def test_an_invalid_file_is_422_with_its_first_error(
    client: TestClient, database: Database
) -> None:
    errors = ["line 1,234: not valid JSON: Expecting ',' delimiter", "line 1,240: missing 'text'"]
    train = add_file(database, status="invalid", errors=errors)
    error = refused(client, text_job_spec(train))
    assert paths(error) == ["dataset.file_id"]
    message = error["fields"][0]["message"]
    assert f"file {train}" in message and "is invalid" in message and errors[0] in message
    assert error["message"].startswith("dataset.file_id: ")


def test_a_file_of_a_kind_the_model_cannot_train_on_is_422(
    client: TestClient, database: Database
) -> None:
    features = add_file(
        database, status="valid", format="csv", kind="classification", stats=CLASSIFICATION_STATS
    )
    error = refused(client, text_job_spec(features))  # tiny-gpt on a CSV of features
    assert paths(error) == ["dataset.file_id"]
    assert "tiny-gpt" in error["fields"][0]["message"]

    cnn = {
        "model": {"type": "cnn"},
        "dataset": {"type": "file", "file_id": features},
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 1,
    }
    error = refused(client, cnn)  # flat features are no images
    assert paths(error) == ["dataset.file_id"] and "images" in error["fields"][0]["message"]
    images = add_file(
        database, status="valid", format="npz", kind="classification", stats=IMAGE_STATS
    )
    cnn["dataset"] = {"type": "file", "file_id": images}
    assert client.post("/v1/jobs", json=cnn).status_code == 201


def test_a_format_other_than_the_files_is_422(client: TestClient, database: Database) -> None:
    train = valid_text_file(database)
    error = refused(client, text_job_spec(train, format="csv"))
    assert paths(error) == ["dataset.format"]
    assert "'jsonl'" in error["fields"][0]["message"]
    assert client.post("/v1/jobs", json=text_job_spec(train, format="jsonl")).status_code == 201


def test_a_validation_file_unlike_the_training_file_is_422(
    client: TestClient, database: Database
) -> None:
    train = valid_text_file(database)
    held_out = add_file(database, status="valid", kind="prompt_completion", stats={"rows": 1})
    error = refused(client, text_job_spec(train, validation_file_id=held_out))
    assert paths(error) == ["dataset.validation_file_id"]


def test_eval_every_needs_something_to_evaluate_on(client: TestClient, database: Database) -> None:
    train = valid_text_file(database)
    error = refused(client, {**text_job_spec(train, eval_fraction=0), "eval_every": 2})
    assert paths(error) == ["eval_every"]
    with_split = {**text_job_spec(train, eval_fraction=0.2), "eval_every": 2}
    assert client.post("/v1/jobs", json=with_split).status_code == 201


def test_tiny_gpt_needs_a_block_for_the_files_longest_texts(
    client: TestClient, database: Database
) -> None:
    train = valid_text_file(database)
    too_long = text_job_spec(train)
    too_long["dataset"]["max_length"] = 34  # 33 inputs into a block of 32
    error = refused(client, too_long)
    assert paths(error) == ["model.block_size"]
    assert "dataset.max_length - 1 = 33" in error["fields"][0]["message"]


def test_the_model_tokenizer_needs_a_hugging_face_model(
    client: TestClient, database: Database
) -> None:
    spec = text_job_spec(valid_text_file(database))
    spec["dataset"]["tokenizer"] = "model"
    error = refused(client, spec)
    assert paths(error) == ["dataset.tokenizer"]
    assert "needs a Hugging Face model" in error["fields"][0]["message"]
