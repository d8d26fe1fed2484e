"""`trainjob run` as a user runs it: a real subprocess, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

SPEC: dict[str, Any] = {
    "model": {"type": "mlp", "hidden_sizes": [32], "dropout": 0.1},
    "dataset": {"type": "synthetic-classification", "n_samples": 256, "n_features": 8},
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 12,
    "checkpoint_every": 5,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "device": "cpu",
}


def trainjob(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=120, env=_env(), **kwargs,
    )  # fmt: skip


def _env() -> dict[str, str]:
    # One thread: the interrupted and the uninterrupted runs reduce in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_spec(path: Path, **changes: Any) -> Path:
    path.write_text(json.dumps({**SPEC, **changes}))
    return path


def test_run_writes_weights_metrics_and_checkpoints(tmp_path: Path) -> None:
    result = trainjob("run", write_spec(tmp_path / "spec.json"), "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "samples_per_sec", "micro_batch_size"} <= set(metrics[0])
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000005", "step-0000010", "step-0000012"]
    weights = load_file(out / "weights.safetensors")
    final_checkpoint = load_file(out / "checkpoints" / "step-0000012" / "weights.safetensors")
    assert weights.keys() == final_checkpoint.keys()
    assert all(torch.equal(weights[name], final_checkpoint[name]) for name in weights)
    assert "step 12/12" in result.stderr and "samples/s" in result.stderr and "ETA" in result.stderr


def test_a_lora_run_writes_the_adapter_for_peft_and_the_merged_weights(tmp_path: Path) -> None:
    model = {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}
    spec = write_spec(
        tmp_path / "spec.json",
        model=model,
        dataset={"type": "tiny-text", "min_length": 8, "max_length": 16},
        max_steps=2,
        checkpoint_every=0,
        lora={"r": 2},
    )
    result = trainjob("run", spec, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(".lora_A." in name or ".lora_B." in name for name in adapter)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    # The final checkpoint holds the adapter; the run's weights are merged, tiny-gpt's names.
    checkpoint = out / "checkpoints" / "step-0000002"
    assert load_file(checkpoint / "weights.safetensors").keys() == adapter.keys()
    merged = (out / "weights.safetensors").read_bytes()
    assert (checkpoint / "merged.safetensors").read_bytes() == merged
    assert "blocks.0.attention.qkv.weight" in load_file(out / "weights.safetensors")
    assert "adapter in" in result.stdout


def test_run_reads_yaml(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {type: mlp}\ndataset: {type: digits}\nbatch_size: 8\n"
        "accumulation_steps: 2\nmax_steps: 2\ndevice: cpu\n"
    )
    result = trainjob("run", spec, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "spec.json").read_text())["micro_batch_size"] == 4


def test_bad_spec_exits_non_zero_with_one_line_per_bad_field(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "bad.json", model={"type": "resnet"}, precision="fp8", seed=-1)
    result = trainjob("run", spec, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert len(lines) == 3
    assert lines[0].startswith(
        "model: unknown model type 'resnet'; "
        "known: cnn, hf-causal-lm, hf-sequence-classification, mlp, tiny-gpt"
    )
    assert lines[1].startswith("precision:") and lines[2].startswith("seed:")
    assert not (tmp_path / "out").exists()


def test_cuda_on_a_machine_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = trainjob(
        "run", write_spec(tmp_path / "s.json", device="cuda"), "--out", tmp_path / "o"
    )
    assert result.returncode == 1
    assert "invalid_device" in result.stderr and "CUDA is not available" in result.stderr


def test_refuses_to_overwrite_an_existing_run(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("")
    result = trainjob("run", write_spec(tmp_path / "s.json"), "--out", tmp_path / "out")
    assert result.returncode == 2 and "--resume" in result.stderr


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_ctrl_c_then_resume_ends_at_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    long_spec = write_spec(tmp_path / "spec.json", max_steps=400, checkpoint_every=0)
    baseline = trainjob("run", long_spec, "--out", tmp_path / "baseline", "--quiet")
    assert baseline.returncode == 0, baseline.stderr

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", str(long_spec), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 60, "the first step")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "continue with: trainjob run --resume" in stderr
    (stopped_at,) = [p.name for p in (out / "checkpoints").iterdir()]
    assert 0 < int(stopped_at.removeprefix("step-")) < 400

    resumed = trainjob("run", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "weights.safetensors").read_bytes() == (
        tmp_path / "baseline" / "weights.safetensors"
    ).read_bytes()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 401))


def test_help_lists_the_run_command() -> None:
    result = trainjob("run", "--help")
    assert result.returncode == 0 and "--resume DIR" in result.stdout


def flat_weights(path: Path) -> torch.Tensor:
    tensors = load_file(path)
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


@pytest.mark.slow
def test_on_two_devices_ctrl_c_then_resume_on_one_ends_at_the_weights_of_one(
    tmp_path: Path,
) -> None:
    spec = write_spec(
        tmp_path / "spec.json",
        model={"type": "mlp", "hidden_sizes": [32]},
        precision="fp64",
        micro_batch_size=2,
        accumulation_steps=2,
        devices=2,
        max_steps=300,
        checkpoint_every=0,
    )
    one = trainjob("run", spec, "--out", tmp_path / "one", "--devices", "1", "--quiet")
    assert one.returncode == 0, one.stderr
    assert json.loads((tmp_path / "one" / "spec.json").read_text())["accumulation_steps"] == 4

    out = tmp_path / "two"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", str(spec), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 120, "the first step")
    process.send_signal(signal.SIGINT)  # to the CLI only, as a terminal's Ctrl-C reaches it
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    (stopped_at,) = [p.name for p in (out / "checkpoints").iterdir()]
    assert 0 < int(stopped_at.removeprefix("step-")) < 300

    resumed = trainjob("run", "--resume", out, "--devices", "1", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    actual, expected = (
        flat_weights(out / "weights.safetensors"),
        flat_weights(tmp_path / "one" / "weights.safetensors"),
    )
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-10
