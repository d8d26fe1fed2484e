"""LoRA jobs through the API and a real worker: exact accumulation on tiny-gpt and a Llama,
the adapter download loaded by peft in a fresh process, the merged download, and a job
whose training process is SIGKILLed mid-run resuming to the same adapter byte for byte.

One API and one worker for the module, started here rather than by `start_service`:
the test must reach the worker's training child to kill it, and the worker needs the
fast lease timings of tests/test_fault_tolerance.py to resume it soon. Four jobs in all
(each costs a worker child's start): the killed job is also one side of tiny-gpt's
(m, k) pair, and its undisturbed twin is trained in this process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from app.db import upgrade
from app.jobs.spec import JobSpec
from cli.main import main
from tests.conftest import REDIS_URL, wait_for
from tests.processes import FAST_TIMINGS, running, service_env, serving, wait_for_status
from worker.engine.trainer import train

FINISHED = {"succeeded", "failed", "cancelled"}
LORA = {"r": 4, "alpha": 8}
TEXT = {"type": "tiny-text", "min_length": 8, "max_length": 16}
COMMON: dict[str, Any] = {
    "dataset": TEXT,
    "max_steps": 3,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "lora": LORA,
    "seed": 7,
    "device": "cpu",
    "precision": "fp64",
}
TINY_GPT = {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}
LLAMA = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,  # tiny-text's characters, and room to spare
    "max_position_embeddings": 32,
}
# Killed mid-run, then resumed; compared byte for byte with its undisturbed twin, and
# within 1e-10 with the same job at (4, 1).
RESUMABLE: dict[str, Any] = COMMON | {
    "model": TINY_GPT,
    "micro_batch_size": 2,
    "accumulation_steps": 2,
    "max_steps": 12,
    "checkpoint_every": 2,
}
TOKENS = [[1, 5, 9, 3, 7, 2, 11], [4, 4, 8, 1, 6, 2, 30]]


@dataclass
class Service:
    client: httpx.Client
    url: str
    llama_dir: Path
    jobs: dict[str, str]

    def finished(self, name: str) -> dict[str, Any]:
        job = wait_for_status(self.client, self.jobs[name], FINISHED, timeout=120)
        assert job["status"] == "succeeded", job["error"]
        return job

    def weights(self, name: str, **params: Any) -> httpx.Response:
        self.finished(name)
        response = self.client.get(f"/v1/jobs/{self.jobs[name]}/weights", params=params)
        assert response.status_code == 200, response.text
        assert int(response.headers["content-length"]) == len(response.content)
        return response

    def tensors(self, name: str, **params: Any) -> dict[str, torch.Tensor]:
        return load_safetensors(self.weights(name, **params).content)


def llama_job(micro: int, steps: int, llama_dir: Path) -> dict[str, Any]:
    model = {"type": "hf-causal-lm", "pretrained": str(llama_dir)}
    return COMMON | {"model": model, "micro_batch_size": micro, "accumulation_steps": steps}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    make_postgres_database: Callable[[], str],
    queue_name: str,
) -> Iterator[Service]:
    models = tmp_path_factory.mktemp("lora-models")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(models / "llama")
    database_url = make_postgres_database()
    upgrade(database_url)
    logs = tmp_path_factory.mktemp("lora")
    env = service_env(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue=f"{queue_name}-lora",
        home=str(logs / "home"),
        hf_model_dirs=str(models),
        **FAST_TIMINGS,
    )
    with (
        serving(env, logs / "api.log") as api,
        httpx.Client(base_url=api.url, timeout=30) as client,
    ):

        def submit(spec: dict[str, Any]) -> str:
            response = client.post("/v1/jobs", json=spec)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        # Slowed (a pause per micro-batch, weights unchanged) so that a job can be killed
        # mid-run: 12 steps of 2 micro-batches take over a second.
        slowed = env | {"TRAINJOB_TEST_FAULTS": "slow=0.05"}
        with running(["worker"], slowed, logs / "worker.log") as worker:
            killed = submit(RESUMABLE)
            wait_for(lambda: checkpoint_steps(client, killed), 90, "a checkpoint", 0.05)
            # The training child, as the kernel's OOM killer would: the worker's parent lives
            # on, starts a new child, and that one resumes the job once its lease expires.
            for child in psutil.Process(worker.pid).children(recursive=True):
                child.send_signal(signal.SIGKILL)
            jobs = {
                "gpt 2x2": killed,
                "gpt 4x1": submit(RESUMABLE | {"micro_batch_size": 4, "accumulation_steps": 1}),
                "llama 2x2": submit(llama_job(2, 2, models / "llama")),
                "llama 4x1": submit(llama_job(4, 1, models / "llama")),
            }
            yield Service(client, str(api.url), models / "llama", jobs)


def checkpoint_steps(client: httpx.Client, job_id: str) -> list[int]:
    page = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    return [checkpoint["step"] for checkpoint in page["data"]]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float64
        assert torch.allclose(actual[name], tensor, rtol=1e-10, atol=1e-12), name


def test_lora_on_a_model_without_adapters_is_refused(service: Service) -> None:
    spec = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "lora": LORA}
    response = service.client.post(
        "/v1/jobs", json=spec | {"batch_size": 8, "max_steps": 1, "micro_batch_size": 8}
    )
    assert response.status_code == 422
    assert "lora: LoRA adapters go on" in response.json()["error"]["message"]
    assert "not on model 'mlp'" in response.json()["error"]["message"]


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_lora_accumulation_is_exact(service: Service, model: str) -> None:
    split = f"{model} 2x2"
    whole = f"{model} 4x1"
    assert_close(
        service.tensors(split, format="safetensors"), service.tensors(whole, format="safetensors")
    )
    assert_close(service.tensors(split, merged="true"), service.tensors(whole, merged="true"))


PEFT_LOGITS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True).double()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(eval(sys.argv[3]))).logits
torch.save(logits, sys.argv[4])
"""


def test_the_adapter_download_loads_with_peft_and_gives_the_job_s_logits(
    service: Service, tmp_path: Path
) -> None:
    response = service.weights("llama 2x2")  # a LoRA job's weights: peft's zip by default
    assert response.headers["content-type"] == "application/zip"
    job_id = service.jobs["llama 2x2"]
    assert f'filename="{job_id}-step-3-adapter.zip"' in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        archive.extractall(tmp_path / "adapter")
        adapter = archive.read("adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(service.llama_dir)
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert adapter == service.weights("llama 2x2", format="safetensors").content

    subprocess.run(
        [
            sys.executable,
            "-c",
            PEFT_LOGITS,
            str(service.llama_dir),
            str(tmp_path / "adapter"),
            json.dumps(TOKENS),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
        timeout=120,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    with_peft = torch.load(tmp_path / "logits.pt")
    # The job's final model, as its merged weights in the base architecture.
    merged = AutoModelForCausalLM.from_pretrained(service.llama_dir, local_files_only=True)
    merged.double().load_state_dict(service.tensors("llama 2x2", merged="true"))
    with torch.no_grad():
        expected = merged.eval()(input_ids=torch.tensor(TOKENS)).logits
    assert torch.allclose(with_peft, expected, rtol=0, atol=1e-10)


def test_a_lora_job_killed_mid_run_resumes_to_the_same_adapter(service: Service) -> None:
    killed = service.finished("gpt 2x2")
    assert killed["attempts"] == 2
    attempts = service.client.get(f"/v1/jobs/{service.jobs['gpt 2x2']}/attempts").json()["data"]
    assert attempts[0]["reason"] == "worker_lost" and attempts[1]["resumed_from_step"] > 0
    # The undisturbed run, on one thread as the worker trains (bit for bit comparable).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        undisturbed = train(JobSpec.model_validate(RESUMABLE))
    finally:
        torch.set_num_threads(threads)
    assert undisturbed.adapter is not None
    assert service.weights("gpt 2x2", format="safetensors").content == undisturbed.adapter[0]
    assert service.weights("gpt 2x2", merged="true").content == undisturbed.weights


def test_merged_weights_come_with_the_final_checkpoint_only(service: Service) -> None:
    service.finished("gpt 4x1")
    job_id = service.jobs["gpt 4x1"]
    mid_run = {"step": 2, "merged": "true"}
    response = service.client.get(f"/v1/jobs/{job_id}/weights", params=mid_run)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["type"] == "no_merged_weights"
    assert "merged weights are written with a LoRA job's final checkpoint" in error["message"]
    merged = service.weights("gpt 4x1", merged="true")
    filename = f'filename="{job_id}-step-12-merged.safetensors"'
    assert filename in merged.headers["content-disposition"]
    # Named as tiny-gpt names its own weights.
    assert "blocks.0.attention.qkv.weight" in load_safetensors(merged.content)
    # A mid-run checkpoint has its adapter.
    mid_run_adapter = service.tensors("gpt 4x1", step=2, format="safetensors")
    assert set(mid_run_adapter) == set(service.tensors("gpt 4x1", format="safetensors"))


def test_a_peft_download_of_a_job_without_lora_is_refused(service: Service) -> None:
    spec = {"model": {"type": "mlp"}, "dataset": {"type": "digits"}, "max_steps": 1}
    response = service.client.post("/v1/jobs", json=spec | {"batch_size": 8, "micro_batch_size": 8})
    job_id = response.json()["id"]
    service.client.post(f"/v1/jobs/{job_id}/cancel")  # it need not train for this
    response = service.client.get(f"/v1/jobs/{job_id}/weights", params={"format": "peft"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["type"] == "no_adapter" and "has no lora" in error["message"]
    both = {"format": "peft", "merged": "true"}
    assert service.client.get(f"/v1/jobs/{job_id}/weights", params=both).status_code == 422


def test_the_cli_downloads_the_adapter_zip_and_the_merged_weights(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.finished("gpt 2x2")
    job_id = service.jobs["gpt 2x2"]
    monkeypatch.chdir(tmp_path)
    assert main(["download", job_id, "--url", service.url]) == 0
    assert (tmp_path / f"{job_id}-adapter.zip").read_bytes() == service.weights("gpt 2x2").content
    assert main(["download", job_id, "--merged", "--url", service.url]) == 0
    merged = service.weights("gpt 2x2", merged="true").content
    assert (tmp_path / f"{job_id}-merged.safetensors").read_bytes() == merged
    assert (
        main(["download", job_id, "--format", "safetensors", "-o", "a.st", "--url", service.url])
        == 0
    )
    assert (tmp_path / "a.st").read_bytes() == service.weights(
        "gpt 2x2", format="safetensors"
    ).content
