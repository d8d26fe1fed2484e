"""The built-in models: tiny-gpt's activation checkpointing recomputes each block in
backward, keeps less for it, and gives the same gradients bit for bit, dropout included."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from app.jobs.spec import MlpSpec, TinyGptSpec
from worker.engine.data_types import DataInfo
from worker.engine.errors import TrainingError
from worker.engine.models import TinyGpt, build_mlp, build_tiny_gpt
from worker.engine.registry import enable_activation_checkpointing

SPEC = TinyGptSpec(n_layer=3, n_head=2, n_embd=16, block_size=32, dropout=0.1)
INFO = DataInfo(vocab_size=40, max_length=33)


def tiny_gpt(checkpointing: bool, seed: int = 0) -> TinyGpt:
    torch.manual_seed(seed)
    model = build_tiny_gpt(SPEC, INFO)
    assert isinstance(model, TinyGpt)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(seed))


def block_calls(model: TinyGpt) -> list[int]:
    """Counts of each block's forward calls so far (a live list)."""
    calls = [0] * len(model.blocks)
    for index, block in enumerate(model.blocks):

        def count(*_: object, index: int = index) -> None:
            calls[index] += 1

        block.register_forward_pre_hook(count)
    return calls


def training_step(model: nn.Module, seed: int = 2) -> None:
    # Dropout draws from the global generator: the same seed, the same masks.
    torch.manual_seed(seed)
    model(tokens()).square().mean().backward()


def test_a_checkpointed_tiny_gpt_runs_each_block_again_in_backward() -> None:
    plain, checkpointed = tiny_gpt(False), tiny_gpt(True)
    plain_calls, checkpointed_calls = block_calls(plain), block_calls(checkpointed)
    training_step(plain)
    training_step(checkpointed)
    assert plain_calls == [1, 1, 1]
    assert checkpointed_calls == [2, 2, 2]


def test_evaluation_and_no_grad_runs_are_not_recomputed() -> None:
    model = tiny_gpt(True)
    calls = block_calls(model)
    with torch.no_grad():
        model(tokens())
    model.eval()
    model(tokens()).sum().backward()  # eval mode: nothing to replay dropout for
    assert calls == [2, 2, 2]


@contextmanager
def saved_bytes() -> Iterator[list[int]]:
    """Bytes of the tensors autograd keeps for backward outside any checkpoint (a
    checkpoint's own hooks take over inside it, and keep nothing there)."""
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def test_a_checkpointed_tiny_gpt_keeps_a_fraction_of_the_activations() -> None:
    with saved_bytes() as plain:
        tiny_gpt(False)(tokens())
    with saved_bytes() as checkpointed:
        tiny_gpt(True)(tokens())
    # What is left: the blocks' inputs, the embeddings, the final norm and the head.
    assert checkpointed[0] < 0.2 * plain[0], (checkpointed[0], plain[0])


def test_checkpointing_gives_the_same_gradients_bit_for_bit_with_dropout() -> None:
    plain, checkpointed = tiny_gpt(False), tiny_gpt(True)
    training_step(plain)
    training_step(checkpointed)
    for (name, expected), actual in zip(
        plain.named_parameters(), checkpointed.parameters(), strict=True
    ):
        assert expected.grad is not None and actual.grad is not None, name
        assert torch.equal(actual.grad, expected.grad), name
    # And the dropout is real: other masks give other gradients.
    other = tiny_gpt(False)
    training_step(other, seed=3)
    assert not torch.equal(other.head.weight.grad, plain.head.weight.grad)  # type: ignore[arg-type]


def test_packed_rows_are_recomputed_with_their_mask_to_the_same_gradients() -> None:
    """dataset.packing: each row of a pack attends only to itself, recomputed or not."""
    # Two rows of 20 and 12 tokens packed into each sequence of 32.
    position_ids = torch.cat([torch.arange(20), torch.arange(12)]).expand(4, 32)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_gpt(checkpointing)
        calls = block_calls(model)
        torch.manual_seed(2)
        model(tokens(), position_ids).square().mean().backward()
        assert calls == ([2, 2, 2] if checkpointing else [1, 1, 1])
        gradients.append([p.grad for p in model.parameters()])
    for expected, actual in zip(*gradients, strict=True):
        assert expected is not None and actual is not None
        assert torch.equal(actual, expected)


def test_parameters_inside_a_block_get_gradients_when_its_input_needs_none() -> None:
    """A frozen embedding (as under LoRA): non-reentrant checkpointing still reaches the
    parameters inside the blocks."""
    model = tiny_gpt(True)
    for embedding in (model.token_embedding, model.position_embedding):
        embedding.requires_grad_(False)
    training_step(model)
    assert all(parameter.grad is not None for parameter in model.blocks.parameters())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads transformers' old names
def test_a_tiny_gpt_wrapped_by_peft_is_checkpointed_to_the_same_adapter_gradients() -> None:
    """LoRA puts a peft model around ours: the switch reaches the TinyGpt inside it."""
    peft = pytest.importorskip("peft")
    adapted = []
    for checkpointing in (False, True):
        model = peft.get_peft_model(tiny_gpt(False), peft.LoraConfig(r=2, target_modules=["qkv"]))
        if checkpointing:
            enable_activation_checkpointing(model)
        calls = block_calls(model.get_base_model())
        training_step(model)
        gradients = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        adapted.append((calls, gradients))
    (plain_calls, expected), (checkpointed_calls, actual) = adapted
    assert (plain_calls, checkpointed_calls) == ([1, 1, 1], [2, 2, 2])
    assert len(actual) == 6 and actual.keys() == expected.keys()  # lora_A and lora_B × 3
    for name, gradient in expected.items():
        assert torch.equal(actual[name], gradient), name


def test_models_without_blocks_to_recompute_are_refused() -> None:
    model = build_mlp(MlpSpec(), DataInfo(input_shape=(8,), num_classes=3))
    with pytest.raises(TrainingError) as refused:
        enable_activation_checkpointing(model)
    assert refused.value.type == "invalid_spec"
    assert "activation_checkpointing" in refused.value.message
