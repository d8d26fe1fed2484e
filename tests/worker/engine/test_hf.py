"""Hugging Face models: built from a config or loaded offline from an allowed directory,
fine-tuned by the engine with exact accumulation, and never a door to code or pickles."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from app.jobs.spec import MAX_PARAMETERS, HfCausalLmSpec, HfSequenceClassificationSpec
from worker.engine.checkpoint import load_weights, weights_to_bytes
from worker.engine.data_types import DataInfo, TextClassificationSet
from worker.engine.errors import TrainingError
from worker.engine.hf import (
    HfLimits,
    build_hf_causal_lm,
    build_hf_sequence_classification,
    load_tokenizer,
    resolve_pretrained,
)
from worker.engine.optim import build_optimizer, build_scheduler
from worker.engine.precision import plan_precision
from worker.engine.registry import build_model, enable_activation_checkpointing
from worker.engine.trainer import Callbacks, StepMetrics, train
from worker.engine.window import StepParts, accumulate_gradients

from .conftest import assert_close_relative, flat_parameters, make_spec
from .test_trainer import weights_vector

# tiny-text's characters and padding fit in 96 token ids, its sequences in 64 positions.
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "vocab_size": 96,
    "n_positions": 64,
    "bos_token_id": 1,
    "eos_token_id": 1,
    # Dropout masks depend on how a batch is cut: off, for equivalence.
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "summary_first_dropout": 0.0,
}
TINY_TEXT = {"type": "tiny-text", "min_length": 2, "max_length": 33}
TEXT_INFO = DataInfo(vocab_size=96, max_length=33)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Nothing here may download, or read the machine's own Hugging Face cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The worker's one TRAINJOB_HF_MODEL_DIRS entry (passed as `allowing(model_dir)`)."""
    allowed = tmp_path / "models"
    allowed.mkdir()
    return allowed


def allowing(model_dir: Path, max_parameters: int = MAX_PARAMETERS) -> HfLimits:
    return HfLimits(model_dirs=(model_dir,), max_parameters=max_parameters)


def save_tiny_gpt2(directory: Path, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = dict(TINY_GPT2)
    del config["model_type"]
    model = GPT2LMHeadModel(GPT2Config(**config))
    model.save_pretrained(directory)
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in memory: no download."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["the cat sat on the mat", "the dog ran"],
        trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def refusal(action: Any) -> TrainingError:
    with pytest.raises(TrainingError) as caught:
        action()
    assert caught.value.type == "invalid_spec"
    return caught.value


# ---------------------------------------------------------------- from a config


def test_causal_lm_from_a_config_gives_logits_per_token() -> None:
    model = build_hf_causal_lm(HfCausalLmSpec(config=TINY_GPT2), TEXT_INFO)
    logits = model(torch.randint(0, 96, (3, 7)))
    assert logits.shape == (3, 7, 96)


def test_a_llama_config_builds_and_runs_in_fp64() -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 96,
        "max_position_embeddings": 64,
    }
    model = build_hf_causal_lm(HfCausalLmSpec(config=config), TEXT_INFO).double()
    logits = model(torch.randint(0, 96, (2, 5)), attention_mask=torch.ones(2, 5))
    assert logits.dtype == torch.float64 and logits.shape == (2, 5, 96)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"model_type": "no-such-model"}, "unknown transformers model type"),
        ({**TINY_GPT2, "n_layers": 2}, "n_layers not known"),
        ({**TINY_GPT2, "n_layer": "two"}, "model.config: "),
        ({**TINY_GPT2, "n_embd": 15}, "model.config"),
        ({**TINY_GPT2, "n_embd": 16384, "n_layer": 48}, "parameters; the maximum is"),
        ({**TINY_GPT2, "vocab_size": 10}, "vocab_size >= 96"),
        ({**TINY_GPT2, "n_positions": 16}, "at most 16 positions"),
    ],
    ids=["model-type", "typo", "type", "heads", "too-big", "vocabulary", "positions"],
)
def test_a_bad_config_is_an_invalid_spec_that_says_why(config: dict[str, Any], words: str) -> None:
    error = refusal(lambda: build_hf_causal_lm(HfCausalLmSpec(config=config), TEXT_INFO))
    assert words in error.message


def test_without_transformers_the_error_says_to_install_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    error = refusal(lambda: build_hf_causal_lm(HfCausalLmSpec(config=TINY_GPT2), TEXT_INFO))
    assert "trainjob[hf]" in error.message


def test_running_out_of_memory_while_loading_is_out_of_memory_not_the_spec_s_fault(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantized base is loaded straight onto its GPU, where it may not fit."""
    save_tiny_gpt2(model_dir / "tiny-gpt2")

    def does_not_fit(*_: Any, **__: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", does_not_fit)
    spec = HfCausalLmSpec(pretrained=str(model_dir / "tiny-gpt2"))
    with pytest.raises(torch.OutOfMemoryError):
        build_hf_causal_lm(spec, TEXT_INFO, allowing(model_dir))


# ---------------------------------------------------------------- from a directory


def test_fine_tuning_a_saved_model_from_its_directory_lowers_the_loss(model_dir: Path) -> None:
    saved = save_tiny_gpt2(model_dir / "tiny-gpt2")
    spec = make_spec(
        model={"type": "hf-causal-lm", "pretrained": str(model_dir / "tiny-gpt2")},
        dataset=TINY_TEXT,
        micro_batch_size=4,
        accumulation_steps=2,
        max_steps=20,
        optimizer={"type": "adamw", "lr": 0.01},
    )
    # It starts from the saved weights, not from fresh ones.
    loaded = build_hf_causal_lm(spec.model, TEXT_INFO, allowing(model_dir))
    tokens = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(loaded(tokens), saved(tokens).logits)

    metrics: list[StepMetrics] = []
    train(spec, Callbacks(on_step=metrics.append), hf_limits=allowing(model_dir))
    losses = [step.loss for step in metrics]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def test_accumulation_over_a_saved_model_is_exact_in_fp64(model_dir: Path) -> None:
    save_tiny_gpt2(model_dir / "tiny-gpt2")
    finals = []
    for micro, steps in [(8, 1), (2, 4), (1, 8)]:
        spec = make_spec(
            model={"type": "hf-causal-lm", "pretrained": str(model_dir / "tiny-gpt2")},
            dataset=TINY_TEXT,
            precision="fp64",
            micro_batch_size=micro,
            accumulation_steps=steps,
            max_steps=10,
            optimizer={"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
            lr_schedule={"type": "cosine", "warmup_steps": 3},
            grad_clip_norm=0.5,
        )
        finals.append(weights_vector(train(spec, hf_limits=allowing(model_dir)).weights))
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-12)


def test_checkpoint_weights_are_the_transformers_model_s_own(
    model_dir: Path, tmp_path: Path
) -> None:
    save_tiny_gpt2(model_dir / "tiny-gpt2")
    spec = HfCausalLmSpec(pretrained=str(model_dir / "tiny-gpt2"))
    model = build_hf_causal_lm(spec, TEXT_INFO, allowing(model_dir))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    # GPT-2 ties its output layer to its token embeddings: stored once, as save_pretrained does.
    weights = weights_to_bytes(model)

    fresh = build_hf_causal_lm(HfCausalLmSpec(config=TINY_GPT2), TEXT_INFO)
    load_weights(fresh, weights)
    torch.testing.assert_close(flat_parameters(fresh), flat_parameters(model), rtol=0, atol=0)

    # A checkpoint's weights file beside the config is a model transformers loads as is.
    exported = tmp_path / "exported"
    model.model.config.save_pretrained(exported)
    (exported / "model.safetensors").write_bytes(weights)
    reloaded = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    tokens = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(reloaded(tokens).logits, model(tokens))


def test_a_name_in_the_hugging_face_cache_loads_offline(tmp_path: Path) -> None:
    # The cache's layout: refs/main names the snapshot directory holding the files.
    repo = tmp_path / "hub-cache" / "models--tiny--gpt2"
    commit = "0" * 40
    save_tiny_gpt2(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_pretrained("tiny/gpt2", []) == repo / "snapshots" / commit
    model = build_hf_causal_lm(HfCausalLmSpec(pretrained="tiny/gpt2"), TEXT_INFO)
    assert model(torch.randint(0, 96, (1, 4))).shape == (1, 4, 96)


def test_a_name_not_in_the_cache_is_refused_without_downloading() -> None:
    error = refusal(lambda: build_hf_causal_lm(HfCausalLmSpec(pretrained="gpt2"), TEXT_INFO))
    assert "not in the worker's Hugging Face cache; downloads are off" in error.message


@pytest.mark.parametrize("how", ["outside", "dot-dot", "symlink", "relative"])
def test_a_path_outside_the_allowed_directories_is_refused(
    how: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    save_tiny_gpt2(elsewhere)
    monkeypatch.chdir(tmp_path)
    pretrained = {
        "outside": str(elsewhere),
        "dot-dot": str(model_dir / ".." / "elsewhere"),
        "symlink": str(model_dir / "link"),
        # A bare name that is a directory where the worker runs is a path, not a Hub name.
        "relative": "elsewhere",
    }[how]
    (model_dir / "link").symlink_to(elsewhere)
    error = refusal(
        lambda: build_hf_causal_lm(
            HfCausalLmSpec(pretrained=pretrained), TEXT_INFO, allowing(model_dir)
        )
    )
    assert "model.pretrained" in error.message and "TRAINJOB_HF_MODEL_DIRS" in error.message


@pytest.mark.parametrize(
    "pretrained", ["a" * 300, "/" + "a" * 300, "~no-such-user-here/model", "not a name", "a/../b"]
)
def test_a_name_that_is_neither_path_nor_hub_name_is_an_invalid_spec(
    pretrained: str, model_dir: Path
) -> None:
    error = refusal(
        lambda: build_hf_causal_lm(
            HfCausalLmSpec(pretrained=pretrained), TEXT_INFO, allowing(model_dir)
        )
    )
    assert error.message.startswith("model.pretrained: ")


def test_pickled_weights_are_refused_and_never_unpickled(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = model_dir / "pickled"
    model = save_tiny_gpt2(directory)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called on a model's weights")

    monkeypatch.setattr(torch, "load", no_unpickling)
    error = refusal(
        lambda: build_hf_causal_lm(
            HfCausalLmSpec(pretrained=str(directory)), TEXT_INFO, allowing(model_dir)
        )
    )
    assert "model.pretrained" in error.message


def test_a_pretrained_model_over_the_parameter_bound_is_refused_before_it_is_loaded(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = save_tiny_gpt2(model_dir / "tiny-gpt2")
    parameters = sum(parameter.numel() for parameter in saved.parameters())
    spec = HfCausalLmSpec(pretrained=str(model_dir / "tiny-gpt2"))
    # Exactly at the bound it loads, counted as the model has them (tied weights once).
    assert (
        flat_parameters(
            build_hf_causal_lm(spec, TEXT_INFO, allowing(model_dir, parameters))
        ).numel()
        == parameters
    )

    def never_loaded(*_: Any, **__: Any) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never_loaded)
    error = refusal(
        lambda: build_hf_causal_lm(spec, TEXT_INFO, allowing(model_dir, parameters - 1))
    )
    assert error.message == (
        f"model.pretrained: has {parameters:,} parameters; the maximum is {parameters - 1:,} "
        "(the worker's TRAINJOB_HF_MAX_PARAMETERS)"
    )


def test_a_pretrained_classifier_is_counted_with_its_head_against_the_bound(
    model_dir: Path,
) -> None:
    save_tiny_gpt2(model_dir / "tiny-gpt2")
    spec = HfSequenceClassificationSpec(pretrained=str(model_dir / "tiny-gpt2"))
    model = build_hf_sequence_classification(spec, CLASSES_INFO, allowing(model_dir))
    parameters = flat_parameters(model).numel()
    error = refusal(
        lambda: build_hf_sequence_classification(
            spec, CLASSES_INFO, allowing(model_dir, parameters - 1)
        )
    )
    assert f"has {parameters:,} parameters" in error.message


def test_code_in_a_model_directory_is_never_run(model_dir: Path, tmp_path: Path) -> None:
    directory = model_dir / "remote-code"
    directory.mkdir()
    marker = tmp_path / "code-ran"
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (directory / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilModel",
                },
            }
        )
    )
    refusal(
        lambda: build_hf_causal_lm(
            HfCausalLmSpec(pretrained=str(directory)), TEXT_INFO, allowing(model_dir)
        )
    )
    assert not marker.exists()


# ---------------------------------------------------------------- sequence classification

CLASSES_INFO = DataInfo(vocab_size=96, max_length=32, num_classes=3, pad_id=0)
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
# A decoder reads the last real token; an encoder reads the first, attending both ways.
CLASSIFIER_CONFIGS = {"gpt2": TINY_GPT2, "bert": TINY_BERT}


def classifier(name: str = "gpt2") -> torch.nn.Module:
    torch.manual_seed(0)
    spec = HfSequenceClassificationSpec(config=CLASSIFIER_CONFIGS[name])
    return build_hf_sequence_classification(spec, CLASSES_INFO).double()


@pytest.mark.parametrize("name", sorted(CLASSIFIER_CONFIGS))
def test_a_sequence_s_class_scores_do_not_depend_on_its_batch_s_padding(name: str) -> None:
    model = classifier(name)
    short = torch.tensor([5, 9, 0])
    long = torch.arange(1, 21)
    alone = model(short[None])
    padded = model(
        torch.stack([torch.cat([short, torch.zeros(17, dtype=torch.long)]), long]),
        attention_mask=torch.stack([torch.arange(20) < 3, torch.ones(20, dtype=torch.bool)]),
    )
    assert alone.shape == (1, 3) and padded.shape == (2, 3)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded[1:], model(long[None]), rtol=1e-12, atol=1e-12)


def test_a_decoder_classifies_by_the_last_real_token_even_when_it_is_the_pad_id() -> None:
    model = classifier("gpt2")
    gpt2 = model.model
    # Its last token is the pad id: transformers' own pooling ("the last token that is
    # not the pad id") would read position 1.
    short = torch.tensor([[5, 9, 0]])
    per_token = gpt2.score(gpt2.transformer(short).last_hidden_state)
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = (torch.arange(7) < 3)[None]
    torch.testing.assert_close(model(padded, attention_mask=mask)[0], per_token[0, 2])


@pytest.mark.parametrize(("micro", "steps"), [(8, 1), (4, 2), (2, 4), (1, 8)])
@pytest.mark.parametrize("name", sorted(CLASSIFIER_CONFIGS))
def test_classifier_window_gradient_equals_the_full_batch_gradient(
    name: str, micro: int, steps: int
) -> None:
    generator = torch.Generator().manual_seed(1)
    lengths = [3, 30, 1, 7, 2, 12, 5, 4]
    data = TextClassificationSet(
        [torch.randint(0, 96, (n,), generator=generator) for n in lengths],
        torch.randint(0, 3, (8,), generator=generator),
        pad_id=0,
    )
    model = classifier(name)
    # Plain PyTorch: one batch of the whole window, mean over its samples.
    batch = data.collate(list(range(8)))
    F.cross_entropy(
        model(batch.inputs, attention_mask=batch.attention_mask), batch.targets
    ).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)

    spec = make_spec()
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    precision = plan_precision("fp64", torch.device("cpu"))
    parts = StepParts(
        model,
        optimizer,
        build_scheduler(spec.lr_schedule, optimizer, 1),
        precision.grad_scaler(),
        precision,
        None,
    )
    accumulate_gradients(parts, data, [list(range(i, i + micro)) for i in range(0, 8, micro)])
    actual = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert_close_relative(actual, expected, 1e-12)


def test_a_pretrained_classifier_gets_a_head_for_the_data_s_classes(model_dir: Path) -> None:
    save_tiny_gpt2(model_dir / "tiny-gpt2")
    spec = HfSequenceClassificationSpec(pretrained=str(model_dir / "tiny-gpt2"))
    model = build_hf_sequence_classification(spec, CLASSES_INFO, allowing(model_dir))
    assert model(torch.randint(1, 96, (4, 6)), attention_mask=torch.ones(4, 6)).shape == (4, 3)
    # Saved with 3 classes, loaded for 5: the head is replaced, the body kept.
    model.model.save_pretrained(model_dir / "three-classes")
    five = DataInfo(vocab_size=96, max_length=32, num_classes=5)
    spec = HfSequenceClassificationSpec(pretrained=str(model_dir / "three-classes"))
    model = build_hf_sequence_classification(spec, five, allowing(model_dir))
    assert model(torch.ones(2, 4).long()).shape == (2, 5)


def labelled_text_file(path: Path) -> Path:
    """Word texts of 1 to 12 words; the label says whether "cat" is among them."""
    generator = torch.Generator().manual_seed(2)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran"]
    with path.open("w") as handle:
        for _ in range(64):
            length = int(torch.randint(1, 13, (1,), generator=generator))
            picks = torch.randint(0, len(words), (length,), generator=generator).tolist()
            text = " ".join(words[i] for i in picks)
            handle.write(json.dumps({"text": text, "label": int("cat" in text.split())}) + "\n")
    return path


def test_a_classifier_fine_tunes_on_a_file_with_its_own_tokenizer_exactly(
    model_dir: Path, tmp_path: Path
) -> None:
    directory = model_dir / "classifier"
    save_tiny_gpt2(directory)
    word_tokenizer().save_pretrained(directory)
    path = labelled_text_file(tmp_path / "labelled.jsonl")
    file_id = "file_" + "0" * 24
    finals, losses = [], []
    for micro, steps in [(16, 1), (4, 4), (1, 16)]:
        spec = make_spec(
            model={"type": "hf-sequence-classification", "pretrained": str(directory)},
            dataset={"type": "file", "file_id": file_id, "tokenizer": "model", "max_length": 64},
            precision="fp64",
            micro_batch_size=micro,
            accumulation_steps=steps,
            max_steps=16,
            # SGD: AdamW divides by the gradients' running scale, which multiplies
            # round-off by about 2 a step (5e-12 after 16 steps here, 2e-16 with SGD).
            optimizer={"type": "sgd", "lr": 0.2, "momentum": 0.9},
        )
        metrics: list[StepMetrics] = []
        result = train(
            spec,
            Callbacks(on_step=metrics.append),
            files=lambda _id: path,
            hf_limits=allowing(model_dir),
        )
        finals.append(weights_vector(result.weights))
        losses.append([step.loss for step in metrics])
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-12)
    assert sum(losses[0][-4:]) < 0.8 * sum(losses[0][:4])


# ---------------------------------------------------------------- activation checkpointing

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    # Dropout in every layer: the recomputation must replay the forward's masks.
    "attention_dropout": 0.1,
}


def llama(checkpointing: bool, lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(HfCausalLmSpec(config=TINY_LLAMA), TEXT_INFO)
    if lora:  # as a LoRA job wraps the transformers model: adapters only train
        model.model = get_peft_model(model.model, LoraConfig(r=4, target_modules=["q_proj"]))
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def mlp_calls(model: torch.nn.Module) -> list[int]:
    """Forward calls of each decoder layer's MLP so far. Not the layer's own: transformers
    checkpoints a layer's `forward`, not its `__call__`, so the layer's hooks run once."""
    calls: list[int] = []
    for module in model.modules():
        if type(module).__name__ == "LlamaMLP":
            index = len(calls)
            calls.append(0)

            def count(*_: object, index: int = index) -> None:
                calls[index] += 1

            module.register_forward_pre_hook(count)
    return calls


def gradients_of_a_step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same dropout masks for every model
    tokens = torch.randint(0, 96, (3, 12))
    mask = torch.ones_like(tokens)
    mask[0, 8:] = 0  # a padded row
    model(tokens, attention_mask=mask).square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


# peft 0.21 reads transformers' deprecated name when it wraps a model: not ours to fix.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpointed_llama_recomputes_its_layers_to_the_same_gradients(lora: bool) -> None:
    plain, checkpointed = llama(False, lora), llama(True, lora)
    plain_calls, checkpointed_calls = mlp_calls(plain), mlp_calls(checkpointed)
    expected, actual = gradients_of_a_step(plain), gradients_of_a_step(checkpointed)
    assert (plain_calls, checkpointed_calls) == ([1, 1], [2, 2])
    # Every trained parameter has its gradient: under LoRA the adapters (2 matrices in
    # each of 2 layers) though the layers' inputs need none.
    trained = {name for name, p in checkpointed.named_parameters() if p.requires_grad}
    assert actual.keys() == expected.keys() == trained and (len(trained) == 4) == lora
    for name, gradient in expected.items():
        assert torch.equal(actual[name], gradient), name


def test_a_checkpointed_classifier_gives_the_same_gradients() -> None:
    models = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = HfSequenceClassificationSpec(config=TINY_BERT | {"hidden_dropout_prob": 0.1})
        models.append(build_model(spec, CLASSES_INFO, activation_checkpointing=checkpointing))
    expected, actual = (gradients_of_a_step(model.train()) for model in models)
    assert expected.keys() == actual.keys()
    for name, gradient in expected.items():
        assert torch.equal(actual[name], gradient), name


def test_a_model_class_without_checkpointing_is_an_invalid_spec() -> None:
    model = llama(False)
    model.model.supports_gradient_checkpointing = False
    error = refusal(lambda: enable_activation_checkpointing(model))
    assert "activation_checkpointing: transformers' LlamaForCausalLM does not support it" in (
        error.message
    )


# ---------------------------------------------------------------- tokenizer


def test_the_tokenizer_saved_with_a_model_encodes_the_data(model_dir: Path) -> None:
    directory = model_dir / "with-tokenizer"
    save_tiny_gpt2(directory)
    word_tokenizer().save_pretrained(directory)
    tokenizer = load_tokenizer(HfCausalLmSpec(pretrained=str(directory)), [model_dir])
    assert tokenizer is not None
    vocabulary = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokenizer.encode("the cat ran") == [vocabulary[w] for w in ("the", "cat", "ran")]
    assert tokenizer.encode("a zebra") == [vocabulary["[UNK]"]] * 2
    assert tokenizer.pad_id == vocabulary["[PAD]"]
    assert tokenizer.vocab_size == len(vocabulary)


def test_no_tokenizer_for_a_config_model_or_a_directory_without_one(model_dir: Path) -> None:
    save_tiny_gpt2(model_dir / "bare")
    assert load_tokenizer(HfCausalLmSpec(config=TINY_GPT2), [model_dir]) is None
    assert load_tokenizer(HfCausalLmSpec(pretrained=str(model_dir / "bare")), [model_dir]) is None
