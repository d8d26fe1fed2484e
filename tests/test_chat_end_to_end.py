"""Chat data through the whole service: a `messages` file uploaded, validated and trained
on a pretrained Llama saved with its tokenizer and chat template.

Real processes (API and one worker) on a database of their own. Conversations of 1 to 3
exchanges and very different lengths, so that normalising by the window's assistant
tokens matters: (m, k) = (2, 4) and (8, 1) in fp64 must give the same weights within
1e-10. A malformed row makes the file invalid naming its line; a model whose tokenizer
has no chat template fails its job `invalid_spec` before training, naming the model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import StartService
from tests.processes import wait_for_status
from tests.test_files_end_to_end import FINISHED, jsonl, upload, validated, weights_of
from tests.worker.datafiles.chat_models import WORDS, save_chat_llama


def conversation(rng: random.Random) -> dict[str, Any]:
    words = WORDS.split()

    def say() -> str:
        return " ".join(rng.choices(words, k=rng.randint(1, 9)))

    messages = [{"role": "system", "content": say()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
    return {"messages": messages}


def chat_file() -> bytes:
    rng = random.Random(3)
    return jsonl([conversation(rng) for _ in range(16)])


def malformed_rows() -> list[dict[str, Any]]:
    """Three conversations; the second's last message has no text."""
    rows = [conversation(random.Random(seed)) for seed in range(3)]
    rows[1]["messages"][-1] = {"role": "assistant", "content": None}
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chat-models")
    save_chat_llama(directory / "chat-llama")
    save_chat_llama(directory / "no-template-llama", template=None)
    return directory


@pytest.fixture(scope="module")
def service(start_service: StartService, models: Path) -> Iterator[httpx.Client]:
    with start_service("chat-e2e", hf_model_dirs=str(models)) as client:
        yield client


def chat_spec(model_dir: Path, file_id: str, micro: int, steps: int) -> dict[str, Any]:
    return {
        "model": {"type": "hf-causal-lm", "pretrained": str(model_dir)},
        "dataset": {"type": "file", "file_id": file_id, "max_length": 64, "eval_fraction": 0},
        "micro_batch_size": micro,
        "accumulation_steps": steps,
        # Two windows of 8 conversations: every row trains once.
        "max_steps": 2,
        "optimizer": {"type": "sgd", "lr": 0.5},
        "precision": "fp64",
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def finished(service: httpx.Client, models: Path) -> dict[str, dict[str, Any]]:
    """Every job of this module, submitted together and run to its end, by name; and the
    malformed file, uploaded first so that its validation runs beside the good one's."""
    bad_id = upload(service, "bad-chat.jsonl", jsonl(malformed_rows()))["id"]
    file_id = upload(service, "chat.jsonl", chat_file())["id"]
    assert validated(service, file_id)["status"] == "valid"
    chat_llama, no_template = models / "chat-llama", models / "no-template-llama"
    specs = {
        "split": chat_spec(chat_llama, file_id, micro=2, steps=4),
        "whole": chat_spec(chat_llama, file_id, micro=8, steps=1),
        "no-template": chat_spec(no_template, file_id, micro=8, steps=1),
    }
    submitted = {}
    for name, spec in specs.items():
        response = service.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        submitted[name] = response.json()["id"]
    jobs = {
        name: wait_for_status(service, job_id, FINISHED, timeout=180)
        for name, job_id in submitted.items()
    }
    return jobs | {"bad-file": validated(service, bad_id)}


def test_a_chat_file_trains_the_same_for_any_split_of_the_window_in_fp64(
    service: httpx.Client, finished: dict[str, dict[str, Any]], models: Path
) -> None:
    split, whole = finished["split"], finished["whole"]
    assert split["status"] == whole["status"] == "succeeded", (split["error"], whole["error"])
    assert whole["metrics"]["grad_norm"] > 0  # the steps moved the weights
    assert split["progress"]["tokens_seen"] == whole["progress"]["tokens_seen"]
    assert split["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-10)
    split_weights = weights_of(service, split["id"])
    whole_weights = weights_of(service, whole["id"])
    assert split_weights.keys() == whole_weights.keys()
    for name, tensor in split_weights.items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(tensor, whole_weights[name], rtol=0, atol=1e-10)


def test_a_model_whose_tokenizer_has_no_chat_template_fails_invalid_spec(
    finished: dict[str, dict[str, Any]], models: Path
) -> None:
    job = finished["no-template"]
    assert job["status"] == "failed"
    assert job["error"]["type"] == "invalid_spec"
    assert (
        f"the tokenizer of model '{models / 'no-template-llama'}' has no chat template"
        in (job["error"]["message"])
    )
    assert job["progress"]["step"] == 0  # refused before any training


def test_a_malformed_chat_row_makes_the_file_invalid_naming_its_line(
    service: httpx.Client, finished: dict[str, dict[str, Any]], models: Path
) -> None:
    checked = finished["bad-file"]
    file_id = checked["id"]
    assert checked["status"] == "invalid"
    last = len(malformed_rows()[1]["messages"])
    assert checked["errors"] == [f'line 2: message {last}: "content" must be a string, not null']
    # And a job on it is refused at submit with that line.
    response = service.post("/v1/jobs", json=chat_spec(models / "chat-llama", file_id, 8, 1))
    assert response.status_code == 422
    assert "line 2: message" in response.text


def test_chat_on_a_model_without_a_chat_template_is_refused_at_submit(
    service: httpx.Client, finished: dict[str, dict[str, Any]]
) -> None:
    file_id = finished["whole"]["spec"]["dataset"]["file_id"]
    tiny_gpt = chat_spec(Path("unused"), file_id, 8, 1) | {
        "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 63}
    }
    response = service.post("/v1/jobs", json=tiny_gpt)
    assert response.status_code == 422, response.text
    assert "train them on hf-causal-lm" in response.text
