"""Chat rows: which tokens carry loss (the assistant turns and the template's end-of-turn
token), rendered with the model's own template, and the errors when that cannot be done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from app.jobs.spec import FileDatasetSpec
from tests.worker.datafiles.chat_models import chat_tokenizer
from tests.worker.datafiles.test_load import TRAIN_ID, Files
from worker.datafiles.chat import NotPrefixStable, TemplateRefused, encode_chat
from worker.datafiles.load import load_file_dataset
from worker.datafiles.validate import ChatMessage
from worker.engine.data_types import IGNORE_INDEX, TokenSequenceSet
from worker.engine.errors import TrainingError
from worker.engine.hf import PretrainedTokenizer
from worker.engine.packing import PackedSequenceSet

CONVERSATION = [
    {"role": "system", "content": "ok"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and two plus four"},
    {"role": "assistant", "content": "six , thanks"},
]


def wrapped(template: str | None = None, **changes: Any) -> PretrainedTokenizer:
    fast = chat_tokenizer(**({"template": template} if template is not None else {}))
    return PretrainedTokenizer(fast, vocab_size=len(fast), pad_id=0)


def messages(rows: list[dict[str, Any]]) -> list[ChatMessage]:
    return [ChatMessage(row["role"], row["content"], row.get("weight", 1)) for row in rows]


def trained_tokens(tokenizer: PretrainedTokenizer, rows: list[dict[str, Any]]) -> list[str]:
    encoded = encode_chat(tokenizer, messages(rows))
    tokens = tokenizer.tokenizer.convert_ids_to_tokens(encoded.ids)
    return [token for token, target in zip(tokens, encoded.targets, strict=True) if target]


def test_the_loss_covers_each_assistant_turn_and_its_end_of_turn_token_only() -> None:
    tokenizer = wrapped()
    encoded = encode_chat(tokenizer, messages(CONVERSATION))
    # The whole conversation, tokenized once, as the template renders it.
    whole = tokenizer.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert encoded.ids == tokenizer.tokenizer.encode(whole, add_special_tokens=False)
    # Not the role tags, not the system's or user's words: what the model must write
    # after "<|assistant|>", up to and including the template's end of turn.
    assert trained_tokens(tokenizer, CONVERSATION) == [
        "four", "<|end|>", "six", ",", "thanks", "<|end|>"
    ]  # fmt: skip


def test_an_assistant_turn_of_weight_0_is_read_but_not_trained() -> None:
    rows = [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0}, *CONVERSATION[3:]]
    tokenizer = wrapped()
    assert trained_tokens(tokenizer, rows) == ["six", ",", "thanks", "<|end|>"]
    # The same tokens as with weight 1: the turn is still in the conversation.
    assert encode_chat(tokenizer, messages(rows)).ids == (
        encode_chat(tokenizer, messages(CONVERSATION)).ids
    )


def test_a_template_that_rewrites_earlier_turns_is_refused_not_guessed() -> None:
    # The turn count up front changes as turns are added: no rendering of a start of the
    # conversation is a prefix of the whole.
    counting = "{{ messages | length }} turns\n" + chat_tokenizer().chat_template
    with pytest.raises(NotPrefixStable, match="up to message 3"):
        encode_chat(wrapped(counting), messages(CONVERSATION))


def test_a_template_that_raises_on_a_conversation_says_why() -> None:
    strict = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('start with a user') }}"
        "{% endif %}" + chat_tokenizer().chat_template
    )
    with pytest.raises(TemplateRefused, match="start with a user"):
        encode_chat(wrapped(strict), messages(CONVERSATION))


# ---------------------------------------------------------------- through the loader


def chat_rows(*conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": conversation} for conversation in conversations]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def load_chat(files: Files, tokenizer: Any, **spec: Any) -> Any:
    spec = {"eval_fraction": 0, **spec}
    return load_file_dataset(
        FileDatasetSpec(file_id=TRAIN_ID, **spec), 0, files, tokenizer, "model 'tiny-chat'"
    )


SHORT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]


def test_chat_rows_load_as_sequences_whose_targets_are_the_assistant_tokens(
    files: Files,
) -> None:
    files.jsonl(TRAIN_ID, chat_rows(CONVERSATION, SHORT))
    tokenizer = wrapped()
    data = load_chat(files, tokenizer)
    assert isinstance(data.train, TokenSequenceSet)
    first = encode_chat(tokenizer, messages(CONVERSATION))
    assert data.train.sequences[0].tolist() == first.ids
    batch = data.train.collate([0, 1])
    # Position i predicts token i+1: a target where token i+1 is an assistant's.
    expected = [
        token if target else IGNORE_INDEX
        for token, target in zip(first.ids[1:], first.targets[1:], strict=True)
    ]
    assert batch.targets[0].tolist() == expected
    # The loss units, counted on the host, are exactly the targets of the batch.
    assert data.train.loss_units([0]) == 6
    assert data.train.loss_units([1]) == 2  # "yes" and its end of turn
    assert int((batch.targets != IGNORE_INDEX).sum()) == data.train.loss_units([0, 1])
    # Packed, each row keeps exactly its targets.
    packed = load_chat(files, tokenizer, packing=True)
    assert isinstance(packed.train, PackedSequenceSet)
    packed_batch = packed.train.collate(list(range(len(packed.train))))
    assert sorted(packed_batch.targets[packed_batch.targets != IGNORE_INDEX].tolist()) == sorted(
        batch.targets[batch.targets != IGNORE_INDEX].tolist()
    )


def test_a_conversation_cut_before_any_assistant_token_is_skipped(
    files: Files,
) -> None:
    # The long conversation's first assistant token is its 12th; the short one's its 5th.
    files.jsonl(TRAIN_ID, chat_rows(CONVERSATION, SHORT))
    data = load_chat(files, wrapped(), max_length=8)
    assert len(data.train) == 1
    assert data.train.loss_units([0]) == 2
    # Cut inside a turn: the tokens that remain still train.
    data = load_chat(files, wrapped(), max_length=12)
    assert len(data.train) == 2
    assert data.train.loss_units([0]) == 1  # "four"; its <|end|> is cut away


def test_a_model_without_a_chat_template_fails_invalid_spec_naming_it(
    files: Files,
) -> None:
    files.jsonl(TRAIN_ID, chat_rows(SHORT))
    no_template = chat_tokenizer(template=None)
    with pytest.raises(TrainingError) as caught:
        load_chat(files, PretrainedTokenizer(no_template, len(no_template), 0))
    assert caught.value.type == "invalid_spec"
    assert "the tokenizer of model 'tiny-chat' has no chat template" in caught.value.message
    with pytest.raises(TrainingError) as caught:
        load_chat(files, None)  # no tokenizer at all: byte level
    assert caught.value.type == "invalid_spec"
    assert "model 'tiny-chat' brings none" in caught.value.message


def test_a_conversation_the_template_refuses_fails_invalid_data_with_its_line(
    files: Files,
) -> None:
    files.write(
        TRAIN_ID,
        "jsonl",
        json.dumps({"messages": SHORT}) + "\n\n" + json.dumps({"messages": CONVERSATION}) + "\n",
    )
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('start with a user') }}"
    strict += "{% endif %}" + chat_tokenizer().chat_template
    with pytest.raises(TrainingError) as caught:
        load_chat(files, wrapped(strict))
    assert caught.value.type == "invalid_data"
    assert f"file {TRAIN_ID}: line 3: the chat template of model 'tiny-chat' refused it" in (
        caught.value.message
    )
    assert "start with a user" in caught.value.message


def test_the_tokens_are_the_models_ids_with_the_template_special_tokens() -> None:
    fast = chat_tokenizer()
    ids = encode_chat(wrapped(), messages(SHORT)).ids
    assert fast.convert_ids_to_tokens(ids) == [
        "<|user|>", "hello", "<|end|>", "<|assistant|>", "yes", "<|end|>"
    ]  # fmt: skip
    assert torch.tensor(ids).max() < len(fast)


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_with_chatml_the_end_of_turn_and_the_newline_after_it_train() -> None:
    # A byte-level BPE (as Qwen's), where the newline after <|im_end|> is a token of its
    # own: the model is trained to write what the template closes its turn with.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        ["user assistant what is two plus two four\n"],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, additional_special_tokens=special)
    fast.chat_template = CHATML
    tokenizer = PretrainedTokenizer(fast, vocab_size=len(fast), pad_id=0)
    encoded = encode_chat(tokenizer, messages(CONVERSATION[1:3]))
    trained = [token for token, target in zip(encoded.ids, encoded.targets, strict=True) if target]
    assert fast.decode(trained) == "four<|im_end|>\n"
