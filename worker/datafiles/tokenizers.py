"""Turning text into token ids: byte-level, character-level, or a model's own tokenizer.

Token 0 is padding for the built-in tokenizers. Neither adds beginning- or end-of-text
tokens: a row's tokens are its text's, so its loss units are known from its length.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Protocol, runtime_checkable


class TextTokenizer(Protocol):
    """What the data loader needs from a tokenizer (a Hugging Face one is wrapped to this)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


@runtime_checkable
class ChatTokenizer(TextTokenizer, Protocol):
    """A tokenizer that can render conversations (a Hugging Face one, wrapped): what
    worker/datafiles/chat.py needs to find the tokens of each assistant turn."""

    @property
    def chat_template(self) -> str | None:
        """The Jinja template conversations are rendered with; None when it has none."""
        ...

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text, as the template writes it (special tokens included)."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of text that already holds its special tokens (none added), and each
        token's (start, end) character offsets in it."""
        ...


class ByteTokenizer:
    """UTF-8 bytes: id = byte + 1, so that 0 stays free for padding. Needs no training
    data, so a validation file never meets an unknown token."""

    vocab_size = 257
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [byte + 1 for byte in text.encode("utf-8")]


class CharTokenizer:
    """The characters of the training file's texts, numbered in sorted order from 2.

    0 is padding and 1 stands for a character the training file never had (one that only
    the validation file holds). Sorting makes the numbering a function of the text alone.
    """

    pad_id = 0
    unknown_id = 1

    def __init__(self, texts: Iterable[str]) -> None:
        self.characters = sorted(set(itertools.chain.from_iterable(texts)))
        self._ids = {char: index + 2 for index, char in enumerate(self.characters)}
        self.vocab_size = len(self.characters) + 2

    def encode(self, text: str) -> list[int]:
        ids, unknown = self._ids, self.unknown_id
        return [ids.get(char, unknown) for char in text]
