"""The official `openai` client against a running trainjob (an API and a real worker, on
a database of their own, with auth on): upload, create, retrieve, list, list_events,
pause, resume, cancel, checkpoints.list, a tiny local Llama fine-tuned on a chat file to
success, and the same job read through the native API; the fine-tuned model's name downloads its
weights.

The worker starts only once the second job has been paused, resumed and cancelled: until
then both jobs wait for their file's validation (`validating_files`), so nothing races
with a worker taking the second job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from app.auth import service as auth_service
from app.db import Database, upgrade
from tests.conftest import REDIS_URL
from tests.processes import FAST_TIMINGS, running, service_env, serving, wait_for
from tests.worker.datafiles.chat_models import save_chat_llama

NUMBERS = ["two", "four", "five", "six", "seven"]
# 8 chat conversations (OpenAI's training format), a batch of 4, one epoch: 2 optimizer
# steps. The model is the chat tests' tiny Llama, saved with a tokenizer and its template.
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"what is {NUMBERS[i % 5]} plus {NUMBERS[(i + 1) % 5]}"},
            {"role": "assistant", "content": NUMBERS[(i + 2) % 5]},
        ]
    }
    for i in range(8)
]
HYPERPARAMETERS = {"batch_size": 4, "n_epochs": 1, "learning_rate_multiplier": 2}


@dataclass
class Service:
    client: openai.OpenAI
    native: httpx.Client  # the same tenant's key, on the native API
    other: openai.OpenAI  # another tenant's key
    other_key: str
    env: dict[str, str]
    logs: Path
    model: str


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> Iterator[Service]:
    models_dir = tmp_path_factory.mktemp("openai-models")
    # 128: the native dataset.max_length, which the mapping leaves.
    save_chat_llama(models_dir / "llama", positions=128)
    database_url = make_postgres_database()
    upgrade(database_url)
    database = Database(database_url)
    with database.sessions.begin() as session:  # keys exist: auth is on
        _, key = auth_service.create_key(session, tenant="acme", admin=False)
        _, other_key = auth_service.create_key(session, tenant="other", admin=False)
    database.dispose()
    logs = tmp_path_factory.mktemp("openai")
    env = service_env(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-openai",
        home=str(logs / "home"),
        hf_model_dirs=str(models_dir),
        **FAST_TIMINGS,
    )
    with (
        serving(env, logs / "api.log") as api,
        httpx.Client(
            base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as native,
        openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0) as client,
        openai.OpenAI(base_url=f"{api.url}/v1", api_key=other_key, max_retries=0) as other,
    ):
        yield Service(client, native, other, other_key, env, logs, str(models_dir / "llama"))


def create(service: Service, training_file: str, **extra: Any) -> Any:
    return service.client.fine_tuning.jobs.create(
        model=service.model,
        training_file=training_file,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        **extra,
    )


def test_the_openai_client_fine_tunes_a_local_model_end_to_end(service: Service) -> None:
    client = service.client
    jsonl = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    uploaded = client.files.create(file=("train.jsonl", jsonl), purpose="fine-tune")
    assert (uploaded.object, uploaded.bytes, uploaded.purpose) == ("file", len(jsonl), "fine-tune")

    job = create(service, uploaded.id, seed=7, suffix="tiny", metadata={"team": "nlp"})
    second = create(service, uploaded.id)
    assert job.object == "fine_tuning.job" and job.model == service.model
    assert job.status == "validating_files"  # no worker yet to validate the file
    assert job.training_file == uploaded.id and job.organization_id == "acme"
    assert job.hyperparameters.batch_size == 4 and job.hyperparameters.n_epochs == 1
    assert job.hyperparameters.learning_rate_multiplier == 2
    assert job.fine_tuned_model is None and job.trained_tokens is None

    # Pause, resume and cancel on the second job, which waits for its file.
    assert client.fine_tuning.jobs.pause(second.id).status == "paused"
    assert client.fine_tuning.jobs.retrieve(second.id).status == "paused"
    assert client.fine_tuning.jobs.resume(second.id).status == "validating_files"
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="is already cancelled"):
        client.fine_tuning.jobs.pause(second.id)

    # Another tenant sees none of it.
    with pytest.raises(openai.NotFoundError):
        service.other.fine_tuning.jobs.retrieve(job.id)
    assert [j.id for j in service.other.fine_tuning.jobs.list()] == []

    with running(["worker"], service.env, service.logs / "worker.log"):

        def finished() -> Any:
            current = client.fine_tuning.jobs.retrieve(job.id)
            return current if current.status in {"succeeded", "failed", "cancelled"} else None

        done = wait_for(finished, 120, f"job {job.id} to finish", interval=0.2)
    assert done.status == "succeeded", done.error
    assert done.error is None and done.finished_at is not None
    assert done.fine_tuned_model == f"ft:{service.model}:acme:tiny:{job.id}"

    # The same job through the native API.
    native = service.native.get(f"/v1/jobs/{job.id}").json()
    assert native["status"] == "succeeded" and native["tenant"] == "acme"
    model = native["spec"]["model"]
    assert (model["type"], model["pretrained"]) == ("hf-causal-lm", service.model)
    assert native["spec"]["seed"] == done.seed == 7
    assert native["batch_size"] == done.hyperparameters.batch_size == 4
    assert native["spec"]["epochs"] == 1 and native["spec"]["name"] == "tiny"
    assert native["spec"]["optimizer"]["lr"] == pytest.approx(2 * 5e-5)
    assert native["spec"]["metadata"] == done.metadata == {"team": "nlp"}
    assert native["progress"]["step"] == 2
    assert done.trained_tokens == native["progress"]["tokens_seen"] > 0
    assert done.created_at == int(_seconds(native["created_at"]))

    # List: newest first, paged by `after`.
    first_page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first_page.data] == [second.id] and first_page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list()] == [second.id, job.id]
    assert [j.status for j in client.fine_tuning.jobs.list()] == ["cancelled", "succeeded"]

    # Events newest first: the job's end first, its metrics typed `metrics`.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # pages through all
    assert events[0].message == "Job succeeded" and events[-1].message == "Job queued"
    assert all(e.object == "fine_tuning.job.event" for e in events)
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [2, 1]
    assert all(isinstance(e.data["train_loss"], float) for e in metrics)
    ids = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [2]
    checkpoint = checkpoints[0]
    assert checkpoint.object == "fine_tuning.job.checkpoint"
    assert checkpoint.fine_tuning_job_id == job.id and checkpoint.metrics.step == 2
    assert checkpoint.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-2"

    # The names download the weights the native API serves.
    weights = service.native.get(f"/v1/jobs/{job.id}/weights")
    assert weights.status_code == 200 and weights.content
    for name in (done.fine_tuned_model, checkpoint.fine_tuned_model_checkpoint):
        by_name = service.native.get(f"/v1/models/{quote(name, safe='')}/weights")
        assert by_name.status_code == 307
        downloaded = service.native.get(by_name.headers["location"])
        assert downloaded.content == weights.content
    # Another tenant's key resolves none of the names.
    other = {"Authorization": f"Bearer {service.other_key}"}
    path = f"/v1/models/{quote(done.fine_tuned_model, safe='')}/weights"
    assert service.native.get(path, headers=other).status_code == 404


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_what_trainjob_does_not_do_is_refused_with_our_message(service: Service) -> None:
    client = service.client
    with pytest.raises(openai.UnprocessableEntityError, match="DPO is not supported"):
        client.fine_tuning.jobs.create(
            model=service.model, training_file="file_" + "0" * 24, method={"type": "dpo"}
        )
    with pytest.raises(openai.UnprocessableEntityError, match="`tracking` field"):
        client.fine_tuning.jobs.create(
            model=service.model,
            training_file="file_" + "0" * 24,
            integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
        )
    with pytest.raises(openai.UnprocessableEntityError, match="purpose: 'batch' is not supported"):
        client.files.create(file=("rows.jsonl", b'{"text": "a"}\n'), purpose="batch")
    with pytest.raises(openai.UnprocessableEntityError, match="training_file: no file"):
        client.fine_tuning.jobs.create(model=service.model, training_file="file_" + "0" * 24)


def test_a_native_job_renders_in_the_openai_shape(service: Service) -> None:
    spec = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "batch_size": 8,
            "micro_batch_size": 8, "max_steps": 1, "seed": 3}  # fmt: skip
    created = service.native.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    job = service.client.fine_tuning.jobs.retrieve(created.json()["id"])
    assert (job.model, job.training_file, job.seed, job.hyperparameters.batch_size) == (
        "mlp",
        None,
        3,
        8,
    )
    assert job.status == "queued"  # no worker runs now
    assert service.client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
