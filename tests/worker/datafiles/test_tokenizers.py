"""The built-in tokenizers: byte-level and the training file's characters."""

from __future__ import annotations

from worker.datafiles.tokenizers import ByteTokenizer, CharTokenizer, TextTokenizer


def test_byte_tokenizer_shifts_utf8_bytes_past_padding() -> None:
    tokenizer: TextTokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.pad_id) == (257, 0)
    assert tokenizer.encode("hé") == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1]
    assert max(ByteTokenizer().encode("\U0010ffff\x00")) <= 256
    assert min(ByteTokenizer().encode("\x00")) == 1


def test_char_tokenizer_numbers_sorted_characters_from_two() -> None:
    tokenizer: TextTokenizer = CharTokenizer(["cab", "bé"])
    assert (tokenizer.vocab_size, tokenizer.pad_id) == (6, 0)
    assert tokenizer.encode("abcé") == [2, 3, 4, 5]


def test_char_tokenizer_maps_unseen_characters_to_unknown() -> None:
    tokenizer = CharTokenizer(["ab"])
    assert tokenizer.encode("azb") == [2, CharTokenizer.unknown_id, 3]


def test_char_tokenizer_is_the_same_for_any_order_of_texts() -> None:
    first = CharTokenizer(["hello", "world"])
    second = CharTokenizer(["dlrow", "olleh"])
    assert first.characters == second.characters
