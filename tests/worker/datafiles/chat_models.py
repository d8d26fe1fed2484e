"""A tiny chat tokenizer and Llama, built offline, for the tests of chat data.

The tokenizer is word level (whitespace and punctuation split, offsets kept) with a
special token per role and `<|end|>`, which its template writes after every message.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = "hello there how are you fine thanks what is two and plus four five six seven ok yes no , ."
# Zephyr's shape: a role tag, the content, an end-of-turn token.
TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A fast tokenizer trained in memory (no download), with `template` as chat template."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [WORDS], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", *ROLE_TOKENS])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = template
    return fast


def save_chat_llama(
    directory: Path, template: str | None = TEMPLATE, *, positions: int = 64
) -> Path:
    """A 1-layer Llama sized to the tokenizer, saved with it (safetensors) in `directory`."""
    tokenizer = chat_tokenizer(template)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
