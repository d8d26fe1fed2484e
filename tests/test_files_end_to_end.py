"""Users' own data through the whole service: upload → validate → train → download.

Real processes (API and one worker) on a Postgres database of their own and Redis;
every file is generated here. For each format a job trains on the uploaded file and its
weights download; an invalid file is refused at submit with its line number; and two
jobs on the same variable-length JSONL file, (m, k) and (m·k, 1) in fp64, end at the
same weights.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.conftest import StartService, wait_for
from tests.processes import wait_for_status

FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def service(start_service: StartService) -> Iterator[httpx.Client]:
    with start_service("files-e2e", progress_flush_seconds="0.2") as client:
        yield client


# ---------------------------------------------------------------- files the tests write


def texts(count: int, seed: int = 0) -> list[str]:
    """Sentences of varied length, so that micro-batches pad differently."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "ducks",
        "sing",
    ]
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(count)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def text_file() -> bytes:
    return jsonl([{"text": text} for text in texts(48)])


def prompt_completion_file() -> bytes:
    pairs = zip(texts(40, seed=1), texts(40, seed=2), strict=True)
    return jsonl([{"prompt": p + " ->", "completion": " " + c} for p, c in pairs])


def csv_file(target: str) -> bytes:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 4))
    lines = ["f1,f2,f3,f4," + target]
    for row in features:
        value = int(row[0] > 0) if target == "label" else float(row @ [1.0, -2.0, 0.5, 0.0])
        lines.append(",".join(f"{x:.5f}" for x in row) + f",{value}")
    return ("\n".join(lines) + "\n").encode()


def npz_images_file() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x=rng.random((40, 1, 8, 8), dtype=np.float32),
        y=rng.integers(0, 3, size=40).astype(np.int64),
    )
    return buffer.getvalue()


# ---------------------------------------------------------------- helpers


def upload(client: httpx.Client, name: str, content: bytes) -> dict[str, Any]:
    response = client.post("/v1/files", files={"file": (name, content)})
    assert response.status_code == 201, response.text
    uploaded: dict[str, Any] = response.json()
    return uploaded


def validated(client: httpx.Client, file_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        found: dict[str, Any] = client.get(f"/v1/files/{file_id}").json()
        return found if found["status"] != "validating" else None

    result: dict[str, Any] = wait_for(done, 60, f"file {file_id} to be validated", interval=0.1)
    return result


def spec_for(model: dict[str, Any], file_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "model": model,
        "dataset": {"type": "file", "file_id": file_id},
        "micro_batch_size": 4,
        "accumulation_steps": 2,
        "max_steps": 6,
        "optimizer": {"type": "adamw", "lr": 0.003},
        "device": "cpu",
        **changes,
    }


def weights_of(client: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    response = client.get(f"/v1/jobs/{job_id}/weights")
    assert response.status_code == 200, response.text
    return load_safetensors(response.content)


def trained(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = wait_for_status(client, response.json()["id"], FINISHED, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    return job


TINY_GPT = {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64}

FORMATS = [
    pytest.param("train.jsonl", text_file, "text", TINY_GPT, {"max_length": 48}, id="jsonl-text"),
    pytest.param(
        "pairs.jsonl",
        prompt_completion_file,
        "prompt_completion",
        TINY_GPT,
        {"max_length": 64},
        id="jsonl-prompt-completion",
    ),
    pytest.param(
        "iris.csv",
        lambda: csv_file("label"),
        "classification",
        {"type": "mlp", "hidden_sizes": [8]},
        {},
        id="csv-classification",
    ),
    pytest.param(
        "prices.csv",
        lambda: csv_file("target"),
        "regression",
        {"type": "mlp", "hidden_sizes": [8]},
        {},
        id="csv-regression",
    ),
    pytest.param(
        "images.npz",
        npz_images_file,
        "classification",
        {"type": "cnn", "channels": [4], "hidden_size": 8},
        {},
        id="npz-images",
    ),
]


@pytest.mark.parametrize(("name", "make", "kind", "model", "dataset"), FORMATS)
def test_upload_validate_train_download(
    service: httpx.Client,
    name: str,
    make: Callable[[], bytes],
    kind: str,
    model: dict[str, Any],
    dataset: dict[str, Any],
) -> None:
    content = make()
    uploaded = upload(service, name, content)
    assert uploaded["status"] == "validating" and uploaded["size_bytes"] == len(content)
    checked = validated(service, uploaded["id"])
    assert checked["status"] == "valid", checked["errors"]
    assert checked["kind"] == kind and checked["stats"]["rows"] > 0

    spec = spec_for(model, uploaded["id"])
    spec["dataset"] |= dataset
    job = trained(service, spec)
    assert job["progress"]["step"] == 6
    weights = weights_of(service, job["id"])
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert service.get(f"/v1/files/{uploaded['id']}/content").content == content


def test_job_submitted_while_its_file_validates_waits_then_trains(service: httpx.Client) -> None:
    uploaded = upload(service, "early.jsonl", text_file())
    # Straight after the upload: the file is (almost always) still validating, and the
    # job must wait in `queued` for it rather than fail or train on unchecked data.
    spec = spec_for(TINY_GPT, uploaded["id"])
    spec["dataset"]["max_length"] = 48
    job = trained(service, spec)
    assert validated(service, uploaded["id"])["status"] == "valid"
    assert job["progress"]["step"] == 6


def test_invalid_file_is_refused_at_submit_with_its_line_number(service: httpx.Client) -> None:
    content = jsonl([{"text": "fine"}] * 3) + b"{not json\n" + jsonl([{"text": "also fine"}])
    uploaded = upload(service, "broken.jsonl", content)
    checked = validated(service, uploaded["id"])
    assert checked["status"] == "invalid"
    assert any("line 4" in error for error in checked["errors"]), checked["errors"]

    spec = spec_for(TINY_GPT, uploaded["id"])
    spec["dataset"]["max_length"] = 48  # fits block_size: the file is what is refused
    response = service.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert "invalid" in response.text and uploaded["id"] in response.text


def test_file_in_use_cannot_be_deleted_until_its_job_ends(service: httpx.Client) -> None:
    uploaded = upload(service, "busy.jsonl", text_file())
    validated(service, uploaded["id"])
    spec = spec_for(TINY_GPT, uploaded["id"], max_steps=200)
    spec["dataset"]["max_length"] = 48
    job_id = service.post("/v1/jobs", json=spec).json()["id"]
    assert service.delete(f"/v1/files/{uploaded['id']}").status_code == 409
    service.post(f"/v1/jobs/{job_id}/cancel")
    wait_for_status(service, job_id, FINISHED, timeout=60)
    assert service.delete(f"/v1/files/{uploaded['id']}").status_code == 204
    assert service.get(f"/v1/files/{uploaded['id']}").status_code == 404


def test_accumulation_is_exact_in_fp64_on_an_uploaded_variable_length_file(
    service: httpx.Client,
) -> None:
    uploaded = upload(service, "exact.jsonl", text_file())
    assert validated(service, uploaded["id"])["status"] == "valid"
    common = {"max_steps": 5, "precision": "fp64", "optimizer": {"type": "sgd", "lr": 0.5}}
    split = spec_for(TINY_GPT, uploaded["id"], micro_batch_size=2, accumulation_steps=5, **common)
    whole = spec_for(TINY_GPT, uploaded["id"], micro_batch_size=10, accumulation_steps=1, **common)
    for spec in (split, whole):
        spec["dataset"]["max_length"] = 48
    weights_split = weights_of(service, trained(service, split)["id"])
    weights_whole = weights_of(service, trained(service, whole)["id"])
    assert weights_split.keys() == weights_whole.keys()
    for name, tensor in weights_split.items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(tensor, weights_whole[name], rtol=1e-10, atol=1e-12)
    # And training moved them: equal weights from no update would prove nothing.
    initial = weights_of(service, trained(service, {**whole, "max_steps": 1})["id"])
    assert any(not torch.equal(initial[name], weights_whole[name]) for name in initial)
