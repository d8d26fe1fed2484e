"""The CUDA-only options, on a GPU with bitsandbytes (the `cuda` extra; bench/gpu.sh
installs it): AdamW with 8-bit moments trains and, stopped mid-run, resumes from its
checkpoint to the bits of an undisturbed run; a tiny Llama's base loaded 4-bit (NF4) or
8-bit (LLM.int8()) trains LoRA adapters whose loss falls, and such a job resumes bit for
bit too.

A resume runs in a process of its own, with deterministic kernels (they stay on in
the process that turns them on), as a worker with TRAINJOB_DETERMINISTIC does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from app.jobs.spec import JobSpec
from tests.cuda.lane import CUDA_LANE
from tests.worker.engine.conftest import make_spec
from worker.engine.checkpoint import Checkpoint, LiveCheckpoint, unpack_state
from worker.engine.hf import HfLimits
from worker.engine.trainer import Callbacks, StepMetrics, TrainResult, train

pytestmark = CUDA_LANE

ROOT = Path(__file__).resolve().parents[2]
TINY_TEXT = {"type": "tiny-text", "min_length": 2, "max_length": 33}
STOP_AFTER = 4
# Width 64: its 64 × 256 feed-forward matrices are over bitsandbytes' min_8bit_size (4,096
# elements), so they get 8-bit moments; dropout, so that the resume must replay its RNG.
EIGHT_BIT_ADAMW: dict[str, Any] = {
    "model": {"type": "tiny-gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32,
              "dropout": 0.1},
    "dataset": TINY_TEXT,
    "optimizer": {"type": "adamw8bit", "lr": 0.01},
    "lr_schedule": {"type": "cosine", "warmup_steps": 2},
    "grad_clip_norm": 1.0,
    "micro_batch_size": 4,
    "accumulation_steps": 2,
    "max_steps": 8,
    "checkpoint_every": STOP_AFTER,
    "seed": 3,
    "device": "cuda",
}  # fmt: skip
# Every Linear of the tiny Llama a multiple of 64 wide (NF4 quantizes blocks of 64).
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,  # tiny-text's characters and padding
    "max_position_embeddings": 64,
}


def save_tiny_llama(directory: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).save_pretrained(directory)
    return directory


def qlora_spec(directory: Path, quantize: str, **changes: Any) -> dict[str, Any]:
    return {
        "model": {"type": "hf-causal-lm", "pretrained": str(directory)},
        "dataset": TINY_TEXT,
        "quantize": quantize,
        "lora": {"r": 8, "alpha": 16},
        "optimizer": {"type": "adamw", "lr": 0.01},
        "micro_batch_size": 4,
        "accumulation_steps": 2,
        "max_steps": 30,
        "device": "cuda",
        **changes,
    }


def trainable(result: TrainResult) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in result.model.parameters()
                      if p.requires_grad])  # fmt: skip


def tensor_dtypes(state: Any) -> set[str]:
    """The dtypes of every tensor in an optimizer state dict, however nested (bitsandbytes
    puts its quantization state in a dict of its own)."""
    if isinstance(state, torch.Tensor):
        return {str(state.dtype)}
    if isinstance(state, dict):
        return set().union(*map(tensor_dtypes, state.values()))
    if isinstance(state, list | tuple):
        return set().union(*map(tensor_dtypes, state))
    return set()


def stop_and_resume(spec_json: str, directory: str) -> dict[str, Any]:
    """Run in a process of its own: the spec trained undisturbed, then stopped after step
    STOP_AFTER (its checkpoint written) and resumed from that checkpoint."""
    spec = JobSpec.model_validate_json(spec_json)
    limits = HfLimits(model_dirs=(Path(directory),))
    losses: list[float] = []
    undisturbed = train(spec, Callbacks(on_step=lambda m: losses.append(m.loss)),
                        hf_limits=limits, deterministic=True)  # fmt: skip
    steps: list[int] = []

    def on_checkpoint(checkpoint: LiveCheckpoint) -> None:
        checkpoint.write(Path(directory) / f"step-{checkpoint.step}")

    stopped = train(
        spec,
        Callbacks(on_step=lambda m: steps.append(m.step), on_checkpoint=on_checkpoint,
                  should_stop=lambda: "stopped" if steps and steps[-1] == STOP_AFTER else None),
        hf_limits=limits,
        deterministic=True,
    )  # fmt: skip
    checkpoint = Checkpoint.read(Path(directory) / f"step-{STOP_AFTER}")
    resumed = train(spec, resume=checkpoint, hf_limits=limits, deterministic=True)
    return {
        "stopped_at": stopped.step,
        "resumed_to": resumed.step,
        "identical": torch.equal(trainable(resumed), trainable(undisturbed)),
        "losses": losses,
        "state_dtypes": sorted(tensor_dtypes(unpack_state(checkpoint.state)["optimizer"])),
    }


def stop_and_resume_in_a_child(spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    code = (
        "import json, sys; from tests.cuda.test_bitsandbytes import stop_and_resume; "
        "print(json.dumps(stop_and_resume(sys.argv[1], sys.argv[2])))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec), str(directory)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def test_adamw8bit_trains_and_resumes_from_its_checkpoint_bit_identically(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    result = stop_and_resume_in_a_child(EIGHT_BIT_ADAMW, tmp_path)
    assert (result["stopped_at"], result["resumed_to"]) == (STOP_AFTER, 8)
    assert result["identical"], "the resumed run's weights differ from the undisturbed run's"
    # The checkpoint holds 8-bit moments (and the 32-bit ones of small tensors).
    assert "torch.uint8" in result["state_dtypes"], result["state_dtypes"]
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize(
    ("quantize", "precision"), [("nf4", "fp32"), ("nf4", "bf16"), ("int8", "fp32")]
)
def test_lora_adapters_on_a_quantized_base_lower_the_loss(
    quantize: str, precision: str, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    directory = save_tiny_llama(tmp_path / "llama")
    spec = make_spec(**qlora_spec(directory, quantize, precision=precision))
    metrics: list[StepMetrics] = []
    result = train(spec, Callbacks(on_step=metrics.append),
                   hf_limits=HfLimits(model_dirs=(tmp_path,)))  # fmt: skip
    assert result.step == 30
    # The base stays 4/8-bit and frozen: only the adapters train, on the GPU.
    frozen = [p for p in result.model.parameters() if not p.requires_grad]
    assert any(p.dtype in (torch.uint8, torch.int8) for p in frozen)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    losses = [m.loss for m in metrics]
    # A frozen random base: the adapters alone take the loss from about ln 96 = 4.56 to
    # about 4.27 in 30 steps (the same model unquantized, on the CPU).
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses


def test_a_qlora_job_stopped_mid_run_resumes_bit_identically(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    directory = save_tiny_llama(tmp_path / "llama")
    spec = qlora_spec(directory, "nf4", max_steps=8, checkpoint_every=STOP_AFTER)
    result = stop_and_resume_in_a_child(spec, tmp_path)
    assert (result["stopped_at"], result["resumed_to"]) == (STOP_AFTER, 8)
    assert result["identical"], "the resumed adapters differ from the undisturbed run's"
