"""Chat rows as token ids and a loss mask, rendered with the model's own chat template.

The conversation is rendered once as text and tokenized once. Which tokens train is
found from the template itself, not from knowledge of any model family: an assistant
turn's text is what the template adds between the conversation before it, rendered
with the generation prompt (`messages[:i]`, `add_generation_prompt=True`: what a user
would send at inference), and the conversation through it (`messages[:i+1]`). That is
exactly what the model must write when prompted for that turn: the content and whatever
the template closes the turn with (`<|eot_id|>`, `<|im_end|>` and its newline, `</s>`),
so that the model learns to stop — as TRL's and transformers' `assistant_only_loss`
mark it with the template's `{% generation %}` block.

A token trains when it starts inside such a span. A token merged across the span's start
(text of the generation prompt and of the content in one token) is read, not predicted.

Both renderings must be prefixes of the whole conversation's text (the template is
"prefix-stable"); a template that rewrites earlier turns once later ones exist (one that
drops earlier reasoning, or numbers the turns from the end) is refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.datafiles.tokenizers import ChatTokenizer
from worker.datafiles.validate import ChatMessage

# A template's own error can quote the whole conversation: keep a job's message short.
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class ChatTokens:
    """A conversation's token ids, and for each whether it is a loss unit (a token the
    model is trained to predict from those before it)."""

    ids: list[int]
    targets: list[bool]


class TemplateRefused(Exception):
    """The template raised on this conversation (e.g. "roles must alternate")."""


class NotPrefixStable(Exception):
    """The template renders a conversation's start differently once more turns follow."""


def encode_chat(tokenizer: ChatTokenizer, messages: Sequence[ChatMessage]) -> ChatTokens:
    """The conversation's tokens; the assistant turns that train are its loss units."""
    conversation = [{"role": message.role, "content": message.content} for message in messages]
    whole = _render(tokenizer, conversation, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if not message.trains:
            continue
        before = _render(tokenizer, conversation[:index], add_generation_prompt=True)
        through = _render(tokenizer, conversation[: index + 1], add_generation_prompt=False)
        if not (whole.startswith(through) and through.startswith(before)):
            raise NotPrefixStable(
                f"rendering the conversation up to message {index + 1} (an assistant's) does "
                "not give the start of the whole conversation's text"
            )
        spans.append((len(before), len(through)))
    ids, offsets = tokenizer.encode_with_offsets(whole)
    targets = [any(start <= token[0] < end for start, end in spans) for token in offsets]
    return ChatTokens(ids, targets)


def _render(
    tokenizer: ChatTokenizer, conversation: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.render_chat(conversation, add_generation_prompt)
    except Exception as error:  # Jinja's errors, and whatever a template's filters raise
        message = " ".join(str(error).split())[:_MAX_MESSAGE] or type(error).__name__
        raise TemplateRefused(message) from error
