"""Sequence packing: packs are a function of the seed, every row keeps its own targets
and loss units, and a model sees each packed row exactly as it sees it alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from app.jobs.spec import HfCausalLmSpec, TinyGptSpec
from worker.engine.data_types import IGNORE_INDEX, DataInfo, TokenSequenceSet
from worker.engine.errors import TrainingError
from worker.engine.hf import build_hf_causal_lm
from worker.engine.models import build_tiny_gpt
from worker.engine.packing import PackedSequenceSet, pack_rows
from worker.engine.window import forward

VOCABULARY = 100
MAX_LENGTH = 17  # 16 positions a pack
INFO = DataInfo(vocab_size=VOCABULARY, max_length=MAX_LENGTH, packed=True)
LLAMA = {
    "model_type": "llama",
    "vocab_size": VOCABULARY,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}
GPT2 = {
    "model_type": "gpt2",
    "vocab_size": VOCABULARY,
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
    "n_positions": 32,
    "bos_token_id": 1,
    "eos_token_id": 1,
}


def rows(lengths: list[int], seed: int = 0) -> TokenSequenceSet:
    """Random token rows of these lengths; each row's first third is its prompt."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(1, VOCABULARY, (n,), generator=generator) for n in lengths]
    return TokenSequenceSet(sequences, pad_id=0, loss_starts=[n // 3 for n in lengths])


LENGTHS = [3, 9, 5, 17, 2, 11, 6, 4, 8, 13, 7, 3]


def test_packs_are_a_function_of_the_seed_and_hold_every_row_once() -> None:
    positions = [length - 1 for length in LENGTHS]
    packs = pack_rows(positions, capacity=16, seed=5)
    assert packs == pack_rows(positions, capacity=16, seed=5)
    assert packs != pack_rows(positions, capacity=16, seed=6)
    assert sorted(row for pack in packs for row in pack) == list(range(len(LENGTHS)))
    assert all(sum(positions[row] for row in pack) <= 16 for pack in packs)
    # Best fit: 76 positions in 5 packs of 16, the fewest that can hold them.
    assert len(packs) == 5
    with pytest.raises(ValueError, match="exceeds the capacity"):
        pack_rows([17], capacity=16, seed=0)


def test_a_pack_holds_each_rows_own_inputs_targets_and_loss_units() -> None:
    unpacked = rows(LENGTHS)
    packed = PackedSequenceSet(unpacked, capacity=MAX_LENGTH - 1, seed=0)
    everything = list(range(len(packed)))
    assert packed.loss_units(everything) == unpacked.loss_units(list(range(len(LENGTHS))))
    batch = packed.collate(everything)
    assert batch.position_ids is not None
    for batch_row, pack in enumerate(packed.packs):
        assert packed.loss_units([batch_row]) == unpacked.loss_units(pack)
        assert int((batch.targets[batch_row] != IGNORE_INDEX).sum()) == unpacked.loss_units(pack)
        start = 0
        for row in pack:
            alone = unpacked.collate([row])
            end = start + unpacked.input_counts[row]
            assert batch.inputs[batch_row, start:end].tolist() == alone.inputs[0].tolist()
            assert batch.targets[batch_row, start:end].tolist() == alone.targets[0].tolist()
            assert batch.position_ids[batch_row, start:end].tolist() == list(range(end - start))
            start = end
        # Padding predicts nothing and is a run of positions of its own.
        assert (batch.targets[batch_row, start:] == IGNORE_INDEX).all()
        assert batch.position_ids[batch_row, start:].tolist() == list(
            range(len(batch.inputs[0]) - start)
        )


def _tiny_gpt() -> nn.Module:
    spec = TinyGptSpec(n_layer=2, n_head=2, n_embd=16, block_size=16)
    return build_tiny_gpt(spec, INFO)


def _hf(config: dict[str, Any]) -> nn.Module:
    return build_hf_causal_lm(HfCausalLmSpec(config=config), INFO)


BUILDERS = {
    "tiny-gpt": _tiny_gpt,
    "llama": lambda: _hf(LLAMA),
    "gpt2": lambda: _hf(GPT2),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_packed_rows_see_only_themselves(name: str) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name]().double().eval()
    unpacked = rows(LENGTHS)
    packed = PackedSequenceSet(unpacked, capacity=MAX_LENGTH - 1, seed=0)
    # A pack of several rows, in a batch with a longer pack (so it is padded too).
    pack = next(index for index, rows_in in enumerate(packed.packs) if len(rows_in) >= 3)
    longest = max(range(len(packed)), key=lambda index: packed.input_counts[index])
    batch = packed.collate([pack, longest] if longest != pack else [pack])
    with torch.no_grad():
        logits = forward(model, batch)[0]
        # Each row's logits in the pack are its logits alone.
        start = 0
        for row in packed.packs[pack]:
            alone = forward(model, unpacked.collate([row]))[0]
            end = start + len(alone)
            torch.testing.assert_close(logits[start:end], alone, rtol=0, atol=1e-12)
            start = end
        # Another first row (new tokens, another length) leaves the others' logits as they were.
        first, *others = packed.packs[pack]
        changed = rows([len(unpacked.sequences[first]) - 1], seed=9)
        swapped = TokenSequenceSet(
            [changed.sequences[0], *(unpacked.sequences[row] for row in others)],
            pad_id=0,
        )
        repacked = PackedSequenceSet(swapped, capacity=MAX_LENGTH - 1, seed=0)
        repacked.packs = [list(range(len(swapped)))]  # in this order, in one pack
        other_logits = forward(model, repacked.collate([0]))[0]
    before = logits[unpacked.input_counts[first] : start]
    after = other_logits[changed.input_counts[0] :]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "config",
    [
        # ALiBi over the whole sequence, and positions counted from the attention mask.
        {
            "model_type": "bloom",
            "vocab_size": VOCABULARY,
            "hidden_size": 16,
            "n_layer": 1,
            "n_head": 2,
        },
        {
            "model_type": "opt",
            "vocab_size": VOCABULARY,
            "hidden_size": 16,
            "ffn_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "word_embed_proj_dim": 16,
        },
    ],
    ids=["bloom", "opt"],
)
def test_a_model_whose_packed_rows_see_each_other_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(TrainingError, match="does not keep packed rows apart") as error:
        build_hf_causal_lm(HfCausalLmSpec(config=config), INFO)
    assert error.value.type == "invalid_spec"
    assert f"model type {config['model_type']!r}" in error.value.message
    # Unpacked, the same model trains.
    build_hf_causal_lm(
        HfCausalLmSpec(config=config), DataInfo(vocab_size=VOCABULARY, max_length=MAX_LENGTH)
    )
