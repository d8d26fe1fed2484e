"""LoRA adapters on the engine's models: what trains, what a checkpoint holds, the merged
weights, and a resume from the adapter alone."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load as load_safetensors

from app.jobs.spec import HfSequenceClassificationSpec, JobSpec, LoraSpec, TinyGptSpec
from worker.engine.checkpoint import Checkpoint, LiveCheckpoint
from worker.engine.data_types import DataInfo
from worker.engine.errors import TrainingError
from worker.engine.hf import build_hf_sequence_classification
from worker.engine.lora import (
    ADAPTER_CONFIG_KEY,
    adapter_tensors,
    apply_lora,
    merged_weights,
    peft_model,
    trainable_parameters,
)
from worker.engine.models import TinyGpt
from worker.engine.trainer import Callbacks, TrainResult, prepare_run, train

TINY_GPT = {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24}
SPEC: dict[str, Any] = {
    "model": TINY_GPT,
    "dataset": {"type": "tiny-text", "min_length": 8, "max_length": 24},
    "micro_batch_size": 2,
    "accumulation_steps": 2,
    "max_steps": 4,
    "checkpoint_every": 2,
    "optimizer": {"type": "adamw", "lr": 0.01},
    "lora": {"r": 4, "alpha": 8},
    "seed": 5,
    "device": "cpu",
}
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 6, 2]])


def written(checkpoint: LiveCheckpoint) -> dict[str, bytes]:
    parts = {"weights": checkpoint.write_weights, "state": checkpoint.write_state}
    if checkpoint.has_merged:
        parts["merged"] = checkpoint.write_merged
    stored = {}
    for name, write in parts.items():
        sink = io.BytesIO()
        write(sink)
        stored[name] = sink.getvalue()
    return stored


def trained(spec: dict[str, Any]) -> tuple[TrainResult, list[tuple[int, dict[str, bytes]]]]:
    saved: list[tuple[int, dict[str, bytes]]] = []
    result = train(
        JobSpec.model_validate(spec),
        Callbacks(on_checkpoint=lambda c: saved.append((c.step, written(c)))),
    )
    return result, saved


def plain_tiny_gpt(vocab_size: int) -> TinyGpt:
    return TinyGpt(TinyGptSpec.model_validate(TINY_GPT), vocab_size)


def test_only_the_adapters_train_and_the_optimizer_holds_only_them() -> None:
    run = prepare_run(JobSpec.model_validate(SPEC))
    trainable = {name for name, p in run.parts.model.named_parameters() if p.requires_grad}
    # tiny-gpt's default targets: its attention's qkv and proj layers.
    assert trainable == {
        f"base_model.model.blocks.0.attention.{layer}.lora_{side}.default.weight"
        for layer in ("qkv", "proj")
        for side in "AB"
    }
    optimized = [p for group in run.parts.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in run.parts.parameters}
    assert len(optimized) == 4
    base = {name: p.detach().clone() for name, p in run.parts.model.named_parameters()}

    result, _ = trained(SPEC)
    after = dict(result.model.named_parameters())
    for name, before in base.items():
        changed = not torch.equal(after[name], before)
        assert changed == (name in trainable), name


def test_a_checkpoint_holds_the_adapter_with_peft_s_names_and_config() -> None:
    _, saved = trained(SPEC)
    steps = [step for step, _ in saved]
    assert steps == [2, 4]
    weights = saved[0][1]["weights"]
    assert set(load_safetensors(weights)) == {
        f"base_model.model.blocks.0.attention.{layer}.lora_{side}.weight"
        for layer in ("qkv", "proj")
        for side in "AB"
    }
    header = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])
    config = json.loads(header["__metadata__"][ADAPTER_CONFIG_KEY])
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["proj", "qkv"]
    assert config["base_model_name_or_path"] is None


def test_only_the_final_checkpoint_has_the_merged_weights() -> None:
    result, saved = trained(SPEC)
    assert "merged" not in saved[0][1]
    assert saved[1][1]["merged"] == result.weights


def test_the_merged_weights_in_the_plain_model_give_the_adapted_model_s_logits() -> None:
    spec = SPEC | {"precision": "fp64"}
    result, saved = trained(spec)
    merged = load_safetensors(saved[-1][1]["merged"])
    plain = plain_tiny_gpt(result.model.base_model.model.head.out_features).double()
    assert set(merged) == set(plain.state_dict())  # the model's own names
    plain.load_state_dict(merged)
    plain.eval()
    result.model.eval()
    with torch.no_grad():
        expected = result.model(TOKENS)
        assert torch.allclose(plain(TOKENS), expected, rtol=0, atol=1e-12)


def test_the_adapter_loads_with_peft_from_pretrained_on_the_base(tmp_path: Path) -> None:
    result, _ = trained(SPEC | {"precision": "fp64"})
    adapter = result.adapter
    assert adapter is not None
    (tmp_path / "adapter_model.safetensors").write_bytes(adapter[0])
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter[1]))
    # The base as the job built it: tiny-gpt's weights come from the seed.
    torch.manual_seed(SPEC["seed"])
    vocab_size = result.model.base_model.model.head.out_features
    base = plain_tiny_gpt(vocab_size).double()
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS), result.model(TOKENS), rtol=0, atol=1e-12)


def test_a_run_resumed_from_an_adapter_checkpoint_ends_bit_identical() -> None:
    undisturbed, saved = trained(SPEC)
    step, parts = saved[0]
    resumed = train(
        JobSpec.model_validate(SPEC),
        resume=Checkpoint(step=step, weights=parts["weights"], state=parts["state"]),
    )
    assert resumed.adapter == undisturbed.adapter
    assert resumed.weights == undisturbed.weights


def test_a_checkpoint_without_lora_is_refused_by_a_lora_spec() -> None:
    _, saved = trained(SPEC | {"lora": None})
    step, parts = saved[0]
    with pytest.raises(TrainingError) as caught:
        train(
            JobSpec.model_validate(SPEC),
            resume=Checkpoint(step=step, weights=parts["weights"], state=parts["state"]),
        )
    assert caught.value.type == "incompatible_checkpoint"


def test_an_unknown_target_module_is_an_invalid_spec() -> None:
    spec = SPEC | {"lora": {"target_modules": ["nowhere"]}}
    with pytest.raises(TrainingError) as caught:
        prepare_run(JobSpec.model_validate(spec))
    assert caught.value.type == "invalid_spec"
    assert "lora.target_modules" in caught.value.message and "nowhere" in caught.value.message


def test_a_job_without_lora_has_no_peft_model() -> None:
    run = prepare_run(JobSpec.model_validate(SPEC | {"lora": None}))
    assert peft_model(run.parts.model) is None
    assert len(trainable_parameters(run.parts.model)) == len(list(run.parts.model.parameters()))


LLAMA_CLASSIFIER = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
    "max_position_embeddings": 32,
}


def test_a_classifier_trains_its_head_beside_the_adapters_and_merges_it() -> None:
    torch.manual_seed(0)
    spec = HfSequenceClassificationSpec(config=LLAMA_CLASSIFIER)
    info = DataInfo(vocab_size=64, num_classes=3, max_length=16)
    model = apply_lora(build_hf_sequence_classification(spec, info), LoraSpec(), spec)
    adapted = peft_model(model)
    assert adapted is not None
    # peft's defaults for Llama (q_proj, v_proj), and the new head.
    assert set(adapter_tensors(adapted)) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        "base_model.model.score.weight",
    }
    head = adapted.base_model.model.score
    before = head.modules_to_save["default"].weight.detach().clone()
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    logits = model(torch.randint(1, 64, (4, 6)), attention_mask=torch.ones(4, 6))
    assert logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 1])).backward()
    optimizer.step()
    trained_head = head.modules_to_save["default"].weight
    assert not torch.equal(trained_head, before)
    # The merged weights carry the trained head under the transformers model's own name.
    merged = merged_weights(adapted)
    assert torch.equal(merged.tensors["score.weight"], trained_head)
    assert not any("lora" in name or "base_layer" in name for name in merged.tensors)


def test_merged_weights_are_made_a_tensor_at_a_time_from_the_live_model() -> None:
    torch.manual_seed(0)
    model = apply_lora(plain_tiny_gpt(32), LoraSpec(r=2), TinyGptSpec.model_validate(TINY_GPT))
    adapted = peft_model(model)
    assert adapted is not None
    with torch.no_grad():  # B starts at zero; make the update visible
        for parameter in trainable_parameters(model):
            parameter.normal_()
    merged = merged_weights(adapted)
    assert set(merged.merged) == {"blocks.0.attention.qkv.weight", "blocks.0.attention.proj.weight"}
    # The base weights are the model's own tensors, not copies.
    qkv = adapted.base_model.model.blocks[0].attention.qkv
    assert (
        merged.tensors["blocks.0.attention.qkv.weight"].data_ptr()
        == qkv.base_layer.weight.data_ptr()
    )
    expected = qkv.base_layer.weight + qkv.get_delta_weight("default")
    base_weight = qkv.base_layer.weight
    assert torch.equal(merged.materialize("blocks.0.attention.qkv.weight", base_weight), expected)
    # Weights without an adapter are written as they are.
    head = merged.tensors["head.weight"]
    assert merged.materialize("head.weight", head) is head
