"""Reading validated files into the engine's sample sets.

The rows are parsed by the same functions that validated them (`validate`), so a file
that trains is a file that passed. What each kind becomes:

- text: token sequences cut to `max_length` tokens for next-token prediction; a row
  too short to predict anything (one token) is skipped;
- prompt_completion: the prompt's tokens followed by the completion's, cut to
  `max_length`; only completion tokens are loss units (the prompt's targets are
  IGNORE_INDEX); a row whose completion is cut away entirely is skipped;
- chat: the conversation rendered with the model's chat template and tokenized once
  (worker/datafiles/chat.py), cut to `max_length`; only the tokens of the assistant
  turns that train are loss units; a row with none left after the cut is skipped, as a
  completion cut away;
- with `packing`, text, prompt_completion and chat rows are packed several to a sample
  (worker/engine/packing.py), each counted as unpacked;
- labelled_text: token sequences with a class, padded per batch with an attention mask;
- classification / regression (CSV, NPZ): feature tensors with class indices, or with
  float targets shaped N × target_size.

Classes are the training file's distinct labels in sorted order, numbered from 0; a
validation file may use only those. Without a validation file, `eval_fraction` of the
training rows is held out by a seeded shuffle.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.files.formats import detect_format
from app.jobs.spec import FileDatasetSpec
from worker.datafiles.chat import NotPrefixStable, TemplateRefused, encode_chat
from worker.datafiles.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    ChatTokenizer,
    TextTokenizer,
)
from worker.datafiles.validate import (
    CHAT,
    CLASSIFICATION,
    DAMAGED_ARCHIVE,
    LABELLED_TEXT,
    PROMPT_COMPLETION,
    REGRESSION,
    SCAN_ELEMENTS,
    JsonlRow,
    Label,
    RowProblem,
    distinct_classes,
    open_xy,
    parse_csv_row,
    read_csv,
    read_jsonl,
    read_npy_as,
)
from worker.engine.data_types import (
    DataInfo,
    DataSplits,
    SampleSet,
    TensorSet,
    TextClassificationSet,
    TokenSequenceSet,
)
from worker.engine.errors import TrainingError
from worker.engine.packing import PackedSequenceSet

# A file id to a local path holding the file's bytes, named `<file id>.<format>`.
FileSource = Callable[[str], Path]


def load_file_dataset(
    spec: FileDatasetSpec,
    seed: int,
    source: FileSource,
    tokenizer: TextTokenizer | None,
    model: str = "the model",
) -> DataSplits:
    """The training split (and held-out split) of a file dataset.

    `tokenizer` is the model's own, for text; None picks from `spec.tokenizer`:
    byte-level, or `char` (the training file's characters). Chat rows need the model's
    own, with a chat template: `model` names the model in the error when it has none.
    """
    train_path = source(spec.file_id)
    validation_path = source(spec.validation_file_id) if spec.validation_file_id else None
    format = spec.format or file_format(train_path)
    if format == "jsonl":
        return _text_splits(spec, seed, train_path, validation_path, tokenizer, model)
    train = _read_table(spec.file_id, train_path, format)
    held_out = None
    if validation_path is not None:
        assert spec.validation_file_id is not None
        held_out = _read_table(
            spec.validation_file_id,
            validation_path,
            spec.format or file_format(validation_path),
            integer_labels=train.integer_labels,
        )
        _check_same_shape(train, held_out)
    return _table_splits(spec, seed, train, held_out)


def file_format(path: Path) -> str:
    """jsonl, csv or npz: from the name's suffix, else from the first bytes."""
    if named := detect_format(path.name):
        return named
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK"):
        return "npz"
    return "jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "csv"


def _invalid(file_id: str, message: str) -> TrainingError:
    return TrainingError("invalid_data", f"file {file_id}: {message}")


def _held_out_order(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): a seeded shuffle cut like the built-in data sets'."""
    if eval_fraction == 0:
        return list(range(count)), []
    # Shuffle once with the seed so the held-out split is not the file's tail.
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = count - round(count * eval_fraction)
    return order[:cut], order[cut:]


def _class_indices(file_id: str, labels: Sequence[Label], classes: Sequence[Label]) -> torch.Tensor:
    """Each label's index among the sorted training classes; unknown labels fail."""
    index = {label: position for position, label in enumerate(classes)}
    unknown = {str(label) for label in labels if label not in index}
    if unknown:
        raise _invalid(file_id, _unknown_labels(unknown))
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


def _unknown_labels(unknown: set[str]) -> str:
    shown = sorted(unknown)
    more = ", …" if len(shown) > 5 else ""
    return f"labels the training file does not have: {', '.join(shown[:5])}{more}"


@dataclass
class _EncodedText:
    kind: str
    sequences: list[torch.Tensor] = field(default_factory=list)
    # Where each sequence's loss units start: after its prompt (1: every next token).
    loss_starts: list[int] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    # Chat: which tokens are loss units (the assistant turns that train).
    loss_masks: list[torch.Tensor] = field(default_factory=list)

    def take(self, rows: list[int]) -> _EncodedText:
        return _EncodedText(
            self.kind,
            [self.sequences[row] for row in rows],
            [self.loss_starts[row] for row in rows],
            [self.labels[row] for row in rows] if self.labels else [],
            [self.loss_masks[row] for row in rows] if self.loss_masks else [],
        )


def _jsonl_rows(file_id: str, path: Path) -> Iterator[tuple[int, JsonlRow]]:
    """(line number, row) of every row; a bad row fails the job, naming its line."""
    for number, row in read_jsonl(path):
        if isinstance(row, RowProblem):
            raise _invalid(file_id, f"line {number}: {row}")
        yield number, row


def _chat_tokenizer(tokenizer: TextTokenizer, model: str) -> ChatTokenizer:
    """The tokenizer chat rows are rendered with, or why there is none (invalid_spec)."""
    needed = 'chat rows ("messages") are rendered with the chat template of the model\'s tokenizer'
    if isinstance(tokenizer, ByteTokenizer | CharTokenizer):
        raise TrainingError(
            "invalid_spec",
            f"{needed}: {model} brings none; train a pretrained Hugging Face model saved "
            "with its tokenizer (dataset.tokenizer 'model')",
        )
    if not isinstance(tokenizer, ChatTokenizer) or tokenizer.chat_template is None:
        raise TrainingError(
            "invalid_spec",
            f"{needed}, but the tokenizer of {model} has no chat template: save the "
            "tokenizer with its chat_template, or train on text or prompt/completion rows",
        )
    return tokenizer


def _chat_ids(
    file_id: str, line: int, row: JsonlRow, tokenizer: ChatTokenizer, model: str
) -> tuple[list[int], list[bool]]:
    try:
        tokens = encode_chat(tokenizer, row.messages)
    except TemplateRefused as error:
        raise _invalid(
            file_id, f"line {line}: the chat template of {model} refused it: {error}"
        ) from None
    except NotPrefixStable as error:
        raise TrainingError(
            "invalid_spec",
            f"the chat template of {model} is not prefix-stable, so the assistant turns' tokens "
            f"cannot be found exactly (file {file_id}, line {line}: {error})",
        ) from None
    return tokens.ids, tokens.targets


def _encode(
    file_id: str, path: Path, tokenizer: TextTokenizer, max_length: int, model: str
) -> _EncodedText | None:
    encoded: _EncodedText | None = None
    chat: ChatTokenizer | None = None
    for line, row in _jsonl_rows(file_id, path):
        if encoded is None:
            encoded = _EncodedText(row.kind)
        loss_mask: list[bool] | None = None
        if row.kind == CHAT:
            if chat is None:  # checked once, at the first row
                chat = _chat_tokenizer(tokenizer, model)
            ids, loss_mask = _chat_ids(file_id, line, row, chat, model)
            ids, loss_mask = ids[:max_length], loss_mask[:max_length]
            loss_start = 1  # unused: the mask says which tokens are loss units
            # No loss unit survives the cut (the first token is never one: nothing
            # comes before it to predict it from).
            if not any(loss_mask[1:]):
                continue
        elif row.kind == PROMPT_COMPLETION:
            prompt = tokenizer.encode(row.prompt)
            ids = (prompt + tokenizer.encode(row.completion))[:max_length]
            loss_start = max(1, len(prompt))
        else:
            # A label needs one token to stand on; text, a token to predict after the first.
            ids = tokenizer.encode(row.text)[:max_length]
            loss_start = 0 if row.kind == LABELLED_TEXT else 1
        if len(ids) <= loss_start:  # no loss unit survives the cut
            continue
        if max(ids) >= tokenizer.vocab_size or min(ids) < 0:
            raise TrainingError(
                "invalid_spec",
                f"the tokenizer gave token id {max(ids)} outside its vocabulary of "
                f"{tokenizer.vocab_size}",
            )
        encoded.sequences.append(torch.tensor(ids, dtype=torch.int32))
        encoded.loss_starts.append(loss_start)
        if loss_mask is not None:
            encoded.loss_masks.append(torch.tensor(loss_mask, dtype=torch.bool))
        if row.label is not None:
            encoded.labels.append(row.label)
    return encoded


def _text_splits(
    spec: FileDatasetSpec,
    seed: int,
    train_path: Path,
    validation_path: Path | None,
    tokenizer: TextTokenizer | None,
    model: str,
) -> DataSplits:
    if tokenizer is None and spec.tokenizer == "char":
        # Characters past max_length are cut before they become tokens: leave them out.
        rows = _jsonl_rows(spec.file_id, train_path)
        tokenizer = CharTokenizer(row.all_text[: spec.max_length] for _, row in rows)
    elif tokenizer is None:
        tokenizer = ByteTokenizer()
    if spec.tokenizer in ("byte", "char"):  # the model's tokenizer is not used
        model = f"dataset.tokenizer {spec.tokenizer!r}"
    train = _encode(spec.file_id, train_path, tokenizer, spec.max_length, model)
    if train is None or not train.sequences:
        raise _invalid(
            spec.file_id, f"no row has enough tokens to train on (max_length {spec.max_length})"
        )
    # The whole training file's labels, before any are held out (one type: sortable).
    classes = sorted(set(train.labels)) if train.kind == LABELLED_TEXT else None
    if validation_path is not None:
        assert spec.validation_file_id is not None
        if (spec.format or file_format(validation_path)) != "jsonl":
            raise _invalid(spec.validation_file_id, "is not JSONL, but the training file is")
        held_out = _encode(
            spec.validation_file_id, validation_path, tokenizer, spec.max_length, model
        )
        if held_out is not None and held_out.kind != train.kind:
            raise _invalid(
                spec.validation_file_id,
                f"holds {held_out.kind} rows, but the training file holds {train.kind} rows",
            )
    else:
        train_rows, held_rows = _held_out_order(len(train.sequences), spec.eval_fraction, seed)
        held_out = train.take(held_rows)
        train = train.take(train_rows)

    if spec.packing and classes is not None:
        raise TrainingError(
            "invalid_spec",
            f"dataset.packing: packs text, prompt/completion and chat rows, not {train.kind} rows",
        )

    def sample_set(file_id: str, encoded: _EncodedText) -> SampleSet:
        if classes is None:
            rows = (
                TokenSequenceSet(encoded.sequences, tokenizer.pad_id, loss_masks=encoded.loss_masks)
                if encoded.kind == CHAT
                else TokenSequenceSet(encoded.sequences, tokenizer.pad_id, encoded.loss_starts)
            )
            # A row of max_length tokens has max_length - 1 positions: so may a pack.
            return PackedSequenceSet(rows, spec.max_length - 1, seed) if spec.packing else rows
        labels = _class_indices(file_id, encoded.labels, classes)
        return TextClassificationSet(encoded.sequences, labels, tokenizer.pad_id)

    info = DataInfo(
        vocab_size=tokenizer.vocab_size,
        max_length=spec.max_length,
        pad_id=tokenizer.pad_id,
        num_classes=None if classes is None else len(classes),
        class_labels=None if classes is None else tuple(classes),
        packed=spec.packing,
    )
    held_id = spec.validation_file_id or spec.file_id
    return DataSplits(
        sample_set(spec.file_id, train),
        sample_set(held_id, held_out) if held_out and held_out.sequences else None,
        info,
    )


@dataclass
class _Table:
    """Feature rows with float targets (regression), or with class labels held without a
    Python object per row: each row's code, and the label each code stands for (codes of
    equal labels may differ, e.g. CSV "1" and "01")."""

    file_id: str
    kind: str
    features: torch.Tensor
    targets: torch.Tensor | None = None
    codes: np.ndarray[Any, Any] | None = None
    labels: Sequence[Label] = ()

    @property
    def integer_labels(self) -> bool:
        return self.kind == CLASSIFICATION and all(isinstance(label, int) for label in self.labels)

    def sample_set(self, classes: list[Label] | None, rows: list[int] | None = None) -> SampleSet:
        """The rows (all by default) with their float targets, or with their indices among
        the sorted training classes (unknown labels fail)."""
        targets = self.targets
        if targets is None:
            assert self.codes is not None and classes is not None
            by_code = _class_indices(self.file_id, self.labels, classes).numpy()
            targets = torch.from_numpy(by_code[self.codes])  # numpy: no int64 copy of the codes
        if rows is None:
            return TensorSet(self.features, targets)
        index = torch.tensor(rows, dtype=torch.long)
        return TensorSet(self.features[index], targets[index])


def _read_table(
    file_id: str, path: Path, format: str, integer_labels: bool | None = None
) -> _Table:
    """A CSV or NPZ file's rows. `integer_labels` (a validation file's) follows the
    training file's reading of CSV labels: integers, or the strings as written."""
    try:
        if format == "csv":
            return _read_csv(file_id, path, integer_labels)
        if format == "npz":
            return _read_npz(file_id, path)
    except RowProblem as problem:
        raise _invalid(file_id, str(problem)) from None
    except DAMAGED_ARCHIVE as error:
        raise _invalid(file_id, f"cannot be read ({error})") from None
    raise _invalid(file_id, f"is a {format} file, but the training file holds rows of features")


def _csv_row_bound(path: Path, columns: int) -> int:
    """At most this many data rows: no more than the file's lines, and no more than its
    bytes allow (a row has a character and a separator for each column), so that arrays
    of this many rows can be allocated up front, whatever a file of blank lines claims."""
    with path.open("rb") as handle:
        lines = sum(block.count(b"\n") for block in iter(partial(handle.read, 1 << 20), b""))
    return min(lines + 1, path.stat().st_size // (2 * columns - 1) + 1)


def _read_csv(file_id: str, path: Path, integer_labels: bool | None) -> _Table:
    layout, lines = read_csv(path)
    # Filled in place as rows stream in: no Python objects per value or per row, and
    # no copy when done (the unused tail of the arrays is never touched, so it takes
    # address space, not memory).
    bound = _csv_row_bound(path, len(layout.columns))
    features = np.empty((bound, len(layout.feature_columns)), dtype=np.float32)
    targets = np.empty(bound, dtype=np.float32)
    codes = np.empty(bound, dtype=np.int32)
    code_of: dict[str, int] = {}  # each distinct raw label, by first appearance
    rows = 0
    for line, cells in lines:
        try:
            row, target = parse_csv_row(layout, cells)
        except RowProblem as problem:
            raise RowProblem(f"line {line}: {problem}") from None
        if rows == bound:  # cannot happen: each row holds a newline and its cells
            raise RowProblem(f"line {line}: more rows than the file's size allows")
        features[rows] = row
        if isinstance(target, str):
            codes[rows] = code_of.setdefault(target, len(code_of))
        else:
            targets[rows] = target
        rows += 1
    features_tensor = torch.from_numpy(features[:rows])
    if layout.kind == REGRESSION:
        target_tensor = torch.from_numpy(targets[:rows].reshape(rows, 1))
        return _Table(file_id, REGRESSION, features_tensor, targets=target_tensor)
    values: list[Label] = list(code_of)
    not_integers = {label for label in code_of if _int_or_none(label) is None}
    if integer_labels and not_integers:
        raise RowProblem(_unknown_labels(not_integers))
    if integer_labels or (integer_labels is None and not not_integers):
        values = [int(label) for label in code_of]
    return _Table(file_id, CLASSIFICATION, features_tensor, codes=codes[:rows], labels=values)


def _int_or_none(label: str) -> int | None:
    try:
        return int(label)
    except ValueError:
        return None


def _read_npz(file_id: str, path: Path) -> _Table:
    with zipfile.ZipFile(path) as archive, open_xy(archive) as (kind, x_npy, y_npy):
        # float64 stays float64 (an fp64 run keeps every digit); anything else trains
        # as float32, converted as it is read.
        x = read_npy_as(x_npy, _float_type(x_npy.dtype))
        y = read_npy_as(y_npy, _float_type(y_npy.dtype) if kind == REGRESSION else np.int64)
    features = torch.from_numpy(x)
    if kind == REGRESSION:
        targets = torch.from_numpy(y).reshape(len(y), -1)
        return _Table(file_id, REGRESSION, features, targets=targets)
    # Codes are the indices among the file's own sorted classes, so that a second file
    # maps them through its labels, as with CSV.
    slices = (y[start : start + SCAN_ELEMENTS] for start in range(0, len(y), SCAN_ELEMENTS))
    classes = distinct_classes(slices)
    assert classes is not None  # no limit
    codes = np.searchsorted(np.array(classes, dtype=y.dtype), y)
    return _Table(file_id, CLASSIFICATION, features, codes=codes, labels=classes)


def _float_type(dtype: np.dtype[Any]) -> type[Any]:
    return np.float64 if dtype == np.float64 else np.float32


def _check_same_shape(train: _Table, held_out: _Table) -> None:
    if held_out.kind != train.kind:
        raise _invalid(
            held_out.file_id,
            f"holds {held_out.kind} rows, but the training file holds {train.kind} rows",
        )
    if held_out.features.shape[1:] != train.features.shape[1:]:
        raise _invalid(
            held_out.file_id,
            f"rows of shape {list(held_out.features.shape[1:])}, but the training file's are "
            f"{list(train.features.shape[1:])}",
        )
    if (
        train.targets is not None
        and held_out.targets is not None
        and held_out.targets.shape[1] != train.targets.shape[1]
    ):
        raise _invalid(
            held_out.file_id,
            f"{held_out.targets.shape[1]} targets per row, but the training file has "
            f"{train.targets.shape[1]}",
        )


def _table_splits(
    spec: FileDatasetSpec, seed: int, train: _Table, held_out: _Table | None
) -> DataSplits:
    # One type: ints, or the strings.
    classes = sorted(set(train.labels)) if train.kind == CLASSIFICATION else None
    info = DataInfo(
        input_shape=tuple(train.features.shape[1:]),
        num_classes=None if classes is None else len(classes),
        class_labels=None if classes is None else tuple(classes),
        target_size=None if train.targets is None else int(train.targets.shape[1]),
    )
    # Every training row trains, in the file's order: no copy of them.
    if held_out is not None or spec.eval_fraction == 0:
        held_set = None if held_out is None else held_out.sample_set(classes)
        return DataSplits(train.sample_set(classes), held_set, info)
    train_rows, held_rows = _held_out_order(len(train.features), spec.eval_fraction, seed)
    return DataSplits(
        train.sample_set(classes, train_rows),
        train.sample_set(classes, held_rows) if held_rows else None,
        info,
    )
