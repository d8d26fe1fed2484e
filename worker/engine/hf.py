"""Hugging Face transformers models: `hf-causal-lm` and `hf-sequence-classification`.

Loading is offline and runs no code from a model's repository: `pretrained` is either
a directory inside one of the worker's TRAINJOB_HF_MODEL_DIRS or a model name already in
the worker's Hugging Face cache; weights are read from safetensors files only (a
pickled `pytorch_model.bin` is refused) and `trust_remote_code` is always off. A
`config` builds a new model from a transformers config. Either is refused before its
weights are allocated if it has more parameters than the caller's bound (the worker's
TRAINJOB_HF_MAX_PARAMETERS). The caller passes both in an `HfLimits`: the engine reads
no settings. A job's `quantize` loads a pretrained base 4- or 8-bit straight onto its GPU,
frozen for adapters (worker/engine/quantize.py).

Each model is wrapped so that the engine sees what it sees of the built-in models:
`forward(input_ids, attention_mask=None) -> logits`, and a state dict that is the
transformers model's own (no wrapper prefix, tied weights stored once), so that a
checkpoint's weights file loads with `from_pretrained` next to the model's config.

transformers is imported only when an hf-* model is built: it is the optional
`trainjob[hf]` extra, and importing it takes seconds.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.jobs.spec import MAX_PARAMETERS, HfCausalLmSpec, HfSequenceClassificationSpec
from worker.engine.data_types import DataInfo
from worker.engine.errors import TrainingError
from worker.engine.quantize import Quantization, prepare_quantized

if TYPE_CHECKING:
    from worker.datafiles.tokenizers import TextTokenizer

HfModelSpec = HfCausalLmSpec | HfSequenceClassificationSpec

# Files any saved transformers tokenizer has at least one of.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A transformers error message can list every known model type: keep the job's short.
_MAX_MESSAGE = 600


@dataclass(frozen=True)
class HfLimits:
    """What the operator allows of Hugging Face models: the directories `pretrained` may
    name (TRAINJOB_HF_MODEL_DIRS) and the most parameters (TRAINJOB_HF_MAX_PARAMETERS)."""

    model_dirs: Sequence[Path] = ()
    max_parameters: int = MAX_PARAMETERS


# No directories: `pretrained` can name only models in the Hugging Face cache.
DEFAULT_LIMITS = HfLimits()


def build_hf_causal_lm(
    spec: HfCausalLmSpec,
    info: DataInfo,
    limits: HfLimits = DEFAULT_LIMITS,
    quantization: Quantization | None = None,
) -> nn.Module:
    """A causal language model: logits [batch, tokens, vocabulary]. With `quantization`,
    its base is loaded quantized onto its device and frozen (worker/engine/quantize.py)."""
    model = _load("AutoModelForCausalLM", spec, limits, quantization=quantization)
    # A sequence of n tokens gives n-1 input positions.
    _check_fits_data(
        model, info, longest_input=None if info.max_length is None else info.max_length - 1
    )
    wrapped = CausalLm(model)
    if info.packed:
        _check_keeps_packed_rows_apart(wrapped, info)
    return wrapped


def build_hf_sequence_classification(
    spec: HfSequenceClassificationSpec,
    info: DataInfo,
    limits: HfLimits = DEFAULT_LIMITS,
    quantization: Quantization | None = None,
) -> nn.Module:
    """A sequence classifier: logits [batch, classes], read at each sequence's last real
    token (decoders) or its first token (encoders). `quantization` as for causal models."""
    if info.num_classes is None:
        raise TrainingError(
            "invalid_data", "hf-sequence-classification needs a labelled data set (num_classes)"
        )
    model = _load(
        "AutoModelForSequenceClassification",
        spec,
        limits,
        num_labels=info.num_classes,
        quantization=quantization,
    )
    if model.config.pad_token_id is None:
        # Decoders refuse batches of more than one sequence without a pad token id; the
        # wrapper pools by the attention mask, so the value only has to be a token id.
        model.config.pad_token_id = info.pad_id or 0
    _check_fits_data(model, info, longest_input=info.max_length)
    return SequenceClassifier(model)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Have a built hf-* model (its wrapper) recompute each layer's activations in backward,
    through transformers' own switch with non-reentrant `torch.utils.checkpoint`. A model
    whose class does not support it fails the job (invalid_spec).

    `model.model` may also be a peft model around the transformers one (LoRA): peft hands
    attributes it does not have to the model it wraps, so the same switch reaches it.
    Non-reentrant checkpointing needs no `enable_input_require_grads` there: it does not run
    the layer inside an autograd Function, whose output would require grad only if an
    input did (and a frozen embedding's output does not), but drops and recomputes the
    saved tensors through autograd hooks, so the adapters inside get their gradients. (The
    newer transformers call it anyway for token models; it only marks the embedding output
    as requiring grad and changes no gradient.)
    """
    inner: Any = model.model if isinstance(model, _Wrapper) else model
    # A peft model names the transformers class it wraps.
    name = type(inner.get_base_model() if hasattr(inner, "get_base_model") else inner).__name__
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise TrainingError(
            "invalid_spec",
            f"activation_checkpointing: transformers' {name} does not support it; "
            "set activation_checkpointing to false",
        )
    # Non-reentrant: the default of newer transformers, and the one that keeps gradients
    # flowing to parameters inside a layer whose input needs none (above). Its default
    # preserve_rng_state=True replays the forward's dropout masks in the recomputation.
    kwargs = {"use_reentrant": False}
    with _transformers_errors("activation_checkpointing"):
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # the name before it, deprecated since
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# Offline, and no code from the model's directory: every loader gets these.
_OFFLINE_AND_SAFE: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


def _import_transformers() -> ModuleType:
    try:
        import transformers
    except ImportError as error:
        raise TrainingError(
            "invalid_spec",
            "Hugging Face models need the transformers library: install trainjob[hf] on the worker",
        ) from error
    return transformers


@contextmanager
def _transformers_errors(field: str) -> Iterator[None]:
    """Whatever transformers raises about a user's model is the spec's fault, never an
    internal error: report it as invalid_spec with transformers' own words. Running out of
    memory (a quantized base is loaded straight onto its GPU) stays out_of_memory."""
    try:
        yield
    except (TrainingError, torch.OutOfMemoryError):
        raise
    except Exception as error:
        message = " ".join(str(error).split())[:_MAX_MESSAGE] or type(error).__name__
        raise TrainingError("invalid_spec", f"{field}: {message}") from error


def _config_from_spec(transformers: ModuleType, values: dict[str, Any]) -> Any:
    """A transformers config from the spec's JSON; unknown keys are refused (a typo would
    otherwise be stored and silently ignored). Takes `model_type` out of `values`."""
    model_type = values.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise TrainingError(
            "invalid_spec",
            f"model.config.model_type: unknown transformers model type {model_type!r}",
        )
    config_class = transformers.CONFIG_MAPPING[model_type]
    with _transformers_errors("model.config"):
        known = (
            set(config_class().to_dict())
            | set(config_class.attribute_map)
            | set(inspect.signature(config_class.__init__).parameters)
            | {"num_labels"}
        )
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainingError(
            "invalid_spec",
            f"model.config: {', '.join(unknown)} not known to transformers' "
            f"{config_class.__name__}",
        )
    with _transformers_errors("model.config"):
        return transformers.AutoConfig.for_model(model_type, **values)


def _load(
    auto_class_name: str,
    spec: HfModelSpec,
    limits: HfLimits,
    num_labels: int | None = None,
    quantization: Quantization | None = None,
) -> Any:
    """A transformers PreTrainedModel of the auto class `auto_class_name` from the spec's
    `config` or `pretrained` directory, refused over `limits.max_parameters` before its
    weights exist. `num_labels` gives a classifier its head: one output per class.
    `quantization` loads a pretrained base quantized (the spec allows it with nothing else)."""
    transformers = _import_transformers()
    auto_class = getattr(transformers, auto_class_name)
    head = {} if num_labels is None else {"num_labels": num_labels}
    if spec.config is not None:
        config = _config_from_spec(transformers, {**spec.config, **head})
        _check_parameters(auto_class, config, limits.max_parameters, "model.config")
        with _transformers_errors("model.config"):
            return auto_class.from_config(config, trust_remote_code=False)
    directory = resolve_pretrained(spec.pretrained or "", limits.model_dirs)
    with _transformers_errors("model.pretrained"):
        saved = transformers.AutoConfig.from_pretrained(directory, **_OFFLINE_AND_SAFE)
        # Counted with the head it will have.
        counted = copy.deepcopy(saved)
        counted.update(head)
    _check_parameters(auto_class, counted, limits.max_parameters, "model.pretrained")
    if num_labels is not None:
        # A head saved for another number of classes is replaced by a fresh one.
        head["ignore_mismatched_sizes"] = saved.num_labels != num_labels
    quantized = {} if quantization is None else quantization.from_pretrained_arguments()
    with _transformers_errors("model.pretrained"):
        model = auto_class.from_pretrained(
            directory, **_OFFLINE_AND_SAFE, use_safetensors=True, **head, **quantized
        )
    return model if quantization is None else prepare_quantized(model)


def _check_parameters(auto_class: Any, config: Any, max_parameters: int, field: str) -> None:
    """Refuse a model of more than `max_parameters` before any of its memory exists: it is
    counted on the meta device, from its config, before weights are built or read."""
    with _transformers_errors(field), torch.device("meta"):
        skeleton = auto_class.from_config(config, trust_remote_code=False)
        parameters = sum(parameter.numel() for parameter in skeleton.parameters())
    if parameters > max_parameters:
        raise TrainingError(
            "invalid_spec",
            f"{field}: has {parameters:,} parameters; the maximum is {max_parameters:,} "
            "(the worker's TRAINJOB_HF_MAX_PARAMETERS)",
        )


def _check_fits_data(model: Any, info: DataInfo, longest_input: int | None) -> None:
    """Token ids past the embedding table or positions past the model's would fail deep
    inside a forward pass: say which field to change instead."""
    # Training never reads back a cache: don't build one.
    model.config.use_cache = False
    embeddings = model.get_input_embeddings().num_embeddings
    if info.vocab_size is not None and info.vocab_size > embeddings:
        raise TrainingError(
            "invalid_spec",
            f"model: its vocabulary has {embeddings} tokens but the data's tokenizer uses "
            f"{info.vocab_size}; use a config with vocab_size >= {info.vocab_size} or the "
            "model's own tokenizer",
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and longest_input is not None and longest_input > positions:
        raise TrainingError(
            "invalid_spec",
            f"model: it takes at most {positions} positions but the data has sequences of "
            f"{longest_input}; lower dataset.max_length or raise the model's positions",
        )


def resolve_pretrained(pretrained: str, allowed_dirs: Sequence[Path]) -> Path:
    """The local directory `pretrained` names: a path inside one of `allowed_dirs`, or a
    model name's snapshot in the Hugging Face cache. Never downloads."""
    if not _looks_like_path(pretrained):
        return _cached_snapshot(pretrained)
    try:
        directory = Path(pretrained).expanduser().resolve()
        inside = any(directory.is_relative_to(Path(root).resolve()) for root in allowed_dirs)
        is_directory = inside and directory.is_dir()
    except (OSError, RuntimeError) as error:  # a name too long, an unknown ~user
        raise TrainingError(
            "invalid_spec", f"model.pretrained: {pretrained!r} is not a usable path: {error}"
        ) from error
    if not inside:
        where = "" if allowed_dirs else " (the worker has none configured)"
        raise TrainingError(
            "invalid_spec",
            f"model.pretrained: {pretrained!r} is not inside the worker's "
            f"TRAINJOB_HF_MODEL_DIRS{where}",
        )
    if not is_directory:
        raise TrainingError("invalid_spec", f"model.pretrained: {pretrained!r} is not a directory")
    return directory


def _looks_like_path(pretrained: str) -> bool:
    if pretrained.startswith((".", "~")) or Path(pretrained).is_absolute():
        return True
    # Anything that exists on disk is a path: transformers would load a directory of
    # that name from the worker's working directory before it looked at the cache.
    try:
        return Path(pretrained).exists()
    except OSError:  # e.g. a name too long for the file system: no Hub name either
        return False


def _cached_snapshot(name: str) -> Path:
    _import_transformers()  # huggingface_hub comes with it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except HFValidationError as error:
        raise TrainingError(
            "invalid_spec",
            f"model.pretrained: {name!r} is neither a directory nor a Hugging Face model name",
        ) from error
    except Exception as error:
        raise TrainingError(
            "invalid_spec",
            f"model.pretrained: {name!r} is not in the worker's Hugging Face cache; downloads "
            "are off (put the model in the cache, or in a directory of TRAINJOB_HF_MODEL_DIRS)",
        ) from error


class _Wrapper(nn.Module):
    """A transformers model as `model`, saved and loaded as the transformers model itself:
    the wrapper's own state dict would prefix every key with "model." and store tied
    weights (GPT-2's lm_head and token embeddings) twice, which safetensors refuses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_state_dict_post_hook(_state_dict_as_transformers)
        self.register_load_state_dict_pre_hook(_load_state_dict_as_transformers)


class CausalLm(_Wrapper):
    """Right padding with causal attention: real tokens never attend to padding, so a
    sequence's logits do not depend on how much padding its micro-batch has.

    Packed rows come with `position_ids` restarting at 0 for each row and no attention
    mask: transformers then finds the rows where the positions restart and builds a
    block-diagonal causal mask for whichever attention the model uses
    (masking_utils.find_packed_sequence_indices). Not every architecture does: packing
    checks the model first (`_check_keeps_packed_rows_apart`).
    """

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        mask = _long_mask(attention_mask)
        outputs = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
        return outputs.logits


# A row's logits packed behind another may differ from its logits alone by rounding (a
# few 1e-7 of their size in fp32); rows that see each other differ by 1e-3 and more.
_PACKED_ROWS_TOLERANCE = 1e-4


def _check_keeps_packed_rows_apart(model: CausalLm, info: DataInfo) -> None:
    """Refuse packing for a model whose rows would see each other in a pack: those whose
    attention does not follow position ids (ALiBi or positions taken from the attention
    mask, as BLOOM and OPT; state-space models). Asked of the model itself, on two short
    rows: packed, each must give the logits it gives alone."""
    transformers_model: Any = model.model
    vocabulary = transformers_model.get_input_embeddings().num_embeddings
    # Rows no longer than the data's: the model takes that many positions.
    length = max(1, min(6, (info.max_length or 7) - 1))
    first = torch.arange(1, length + 1) % vocabulary
    second = (torch.arange(length) * 7 + 3) % vocabulary
    device = next(model.parameters()).device
    packed = torch.cat([first, second]).to(device)
    positions = torch.cat([torch.arange(length), torch.arange(length)]).to(device)
    was_training = model.training
    model.eval()  # no dropout: the same row must give the same logits
    try:
        with torch.no_grad(), _transformers_errors("dataset.packing"):
            alone = torch.cat([model(row[None].to(device))[0] for row in (first, second)])
            together = model(packed[None], position_ids=positions[None])[0]
    finally:
        model.train(was_training)
    error = (together - alone).abs().max().item()
    if not error <= _PACKED_ROWS_TOLERANCE * alone.abs().max().item():
        model_type = transformers_model.config.model_type
        raise TrainingError(
            "invalid_spec",
            f"dataset.packing: model type {model_type!r} does not keep packed rows apart (its "
            "attention does not follow each row's position ids: a row's logits change when "
            "another row is packed before it); train this model without packing",
        )


class SequenceClassifier(_Wrapper):
    """Decoders score every token and transformers keeps the last one that is not the pad
    token id, which is wrong for a text whose own last token has that id. The wrapper
    takes the per-token scores and picks each sequence's last real token by the attention
    mask instead. Encoders (BERT-like) read their first token and return [batch, classes]
    themselves; their scores are used as they are."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        head = getattr(self.model, "score", None)
        if head is None:
            head = getattr(self.model, "classifier", None)
        per_token: list[torch.Tensor] = []
        # Registered per call, not in __init__: a hook closing over this wrapper would
        # follow a deep copy of it and write into the original.
        hooked = (
            head.register_forward_hook(lambda _module, _inputs, output: per_token.append(output))
            if isinstance(head, nn.Module)
            else nullcontext()
        )
        with hooked:
            logits = self.model(
                input_ids=input_ids, attention_mask=_long_mask(attention_mask)
            ).logits
        if len(per_token) == 1 and per_token[0].dim() == 3:
            return per_token[0][
                torch.arange(len(input_ids), device=input_ids.device),
                _last_real_token(input_ids, attention_mask),
            ]
        return logits


def _long_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    # transformers reads 1 as "attend" from integer masks; a batch moved to a float dtype
    # or a boolean mask becomes that form.
    return None if attention_mask is None else (attention_mask != 0).long()


def _last_real_token(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    length = input_ids.shape[-1]
    if attention_mask is None:
        return torch.full((len(input_ids),), length - 1, device=input_ids.device)
    positions = torch.arange(length, device=input_ids.device)
    return (positions * (attention_mask != 0)).argmax(-1)


_INNER = "model."


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: name} of parameters that are the same tensor as an earlier one."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(parameter), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def _state_dict_as_transformers(
    wrapper: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any
) -> None:
    aliases = tied_aliases(wrapper.get_submodule("model"))
    for key in [key for key in state_dict if key.startswith(prefix + _INNER)]:
        value = state_dict.pop(key)
        name = key[len(prefix + _INNER) :]
        if name not in aliases:
            state_dict[prefix + name] = value


def _load_state_dict_as_transformers(
    wrapper: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + _INNER + key[len(prefix) :]] = state_dict.pop(key)
    for alias, name in tied_aliases(wrapper.get_submodule("model")).items():
        if prefix + _INNER + name in state_dict:
            state_dict[prefix + _INNER + alias] = state_dict[prefix + _INNER + name]


@dataclass(frozen=True)
class PretrainedTokenizer:
    """A transformers tokenizer as the data loader's TextTokenizer (and ChatTokenizer).

    `encode` adds what the tokenizer adds by default (BERT's [CLS] … [SEP], Llama's
    <s>; GPT-2 adds nothing) and nothing else. Conversations are rendered with the
    tokenizer's chat template (worker/datafiles/chat.py).
    """

    tokenizer: Any
    vocab_size: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @property
    def chat_template(self) -> str | None:
        # A dict of named templates where a tokenizer keeps several; "default" is used.
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template if isinstance(template, str) and template else None

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise TrainingError(
                "invalid_spec",
                "chat data needs the model's fast tokenizer (a tokenizer.json saved with it), "
                "which says where each token is in the text",
            )
        # The template wrote the special tokens (BOS included) already: add none.
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(int(start), int(end)) for start, end in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), offsets


def load_tokenizer(spec: HfModelSpec, model_dirs: Sequence[Path]) -> TextTokenizer | None:
    """The tokenizer saved with a pretrained model; None for a `config` model or a
    directory without one."""
    if spec.pretrained is None:
        return None
    directory = resolve_pretrained(spec.pretrained, model_dirs)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    transformers = _import_transformers()
    with _transformers_errors("model.pretrained (its tokenizer)"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **_OFFLINE_AND_SAFE)
    pad_id = tokenizer.pad_token_id
    if not isinstance(pad_id, int):  # GPT-2 has none: pad with its end of text
        pad_id = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else 0
    # len() counts tokens added after training the vocabulary; vocab_size does not.
    return PretrainedTokenizer(tokenizer, vocab_size=len(tokenizer), pad_id=pad_id)
