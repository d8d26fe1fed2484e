"""Checks an uploaded file once, streaming it, and says what it holds or what is wrong.

Messages name lines as an editor shows them (1-based; a CSV header is line 1), so a
user can jump straight to the problem. The row parsers here are shared with
`worker.datafiles.load`: what passes validation is exactly what trains.

numpy only: the validation task must not pay for importing torch, and nothing in a
file is ever unpickled (NPZ arrays of Python objects are refused from their header).
"""

from __future__ import annotations

import csv
import json
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from numpy.lib import format as npy_format

TEXT, PROMPT_COMPLETION, LABELLED_TEXT = "text", "prompt_completion", "labelled_text"
CHAT = "chat"
CLASSIFICATION, REGRESSION = "classification", "regression"

MAX_ERRORS = 20
MAX_LISTED_LABELS = 1000
# A column with more distinct values than this is a quantity to predict, not a class.
MAX_CLASSES = 10_000
# An NPZ array is compressed: its header says how large it unpacks, and a worker must
# hold it in memory to train.
MAX_ARRAY_BYTES = 8 * 2**30
# Deflate packs zeros about 1000 to 1: a few MB can declare arrays of gigabytes (a zip
# bomb). Real data sets pack far less (images about 5×, float features about 1.1×), so an
# array may declare at most this multiple of its compressed bytes; data that repetitive
# can be saved uncompressed (`numpy.savez`), where the bytes it declares are the bytes sent.
MAX_NPZ_EXPANSION = 100
# Elements of an array read at a time: bounds validation's memory for any x and y.
SCAN_ELEMENTS = 1 << 20

Label = int | str


@dataclass(frozen=True)
class ValidationReport:
    status: Literal["valid", "invalid"]
    kind: str | None
    errors: list[str]
    stats: dict[str, Any]

    @classmethod
    def invalid(cls, message: str) -> ValidationReport:
        """A file found invalid without being read through (its checks crashed)."""
        return cls("invalid", None, [message], {})


class RowProblem(Exception):
    """What is wrong with one row or line; the caller says where it is."""


class _Problems:
    """The first MAX_ERRORS messages, and a count of the rest."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.messages) < MAX_ERRORS:
            self.messages.append(message)

    def listed(self) -> list[str]:
        if self.count <= MAX_ERRORS:
            return self.messages
        return [*self.messages[: MAX_ERRORS - 1], f"… and {self.count - MAX_ERRORS + 1} more"]


def validate_file(path: Path, format: str) -> ValidationReport:
    """Stream the file once: its kind and stats, or up to MAX_ERRORS messages."""
    problems = _Problems()
    kind: str | None = None
    stats: dict[str, Any] = {"rows": 0}
    validators = {"jsonl": _validate_jsonl, "csv": _validate_csv, "npz": _validate_npz}
    if format not in validators:
        problems.add(f"unknown format {format!r}; known: {', '.join(validators)}")
    elif path.stat().st_size == 0:
        problems.add("the file is empty")
    else:
        kind, stats = validators[format](path, problems)
    if problems.count:
        return ValidationReport("invalid", kind, problems.listed(), {"rows": stats.get("rows", 0)})
    return ValidationReport("valid", kind, [], stats)


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowProblem(
            f"not valid UTF-8 (byte {raw[error.start]:#04x} at byte {error.start + 1})"
        ) from None


def _short(text: str) -> str:
    return json.dumps(text if len(text) <= 40 else text[:39] + "…", ensure_ascii=False)


class LabelSet:
    """The distinct class labels of a file, kept in the one type the file gives them."""

    def __init__(self) -> None:
        self.values: set[Label] = set()
        self._first: tuple[int, type] | None = None

    def add(self, label: Label, line: int) -> None:
        if self._first is None:
            self._first = (line, type(label))
        elif type(label) is not self._first[1]:
            first_line, first_type = self._first
            raise RowProblem(
                f'"label" is {_TYPE_NAMES[type(label)]} but at line {first_line} it is '
                f"{_TYPE_NAMES[first_type]}: use one type for every label"
            )
        if label not in self.values and len(self.values) >= MAX_CLASSES:
            raise RowProblem(
                f'more than {MAX_CLASSES:,} distinct values of "label": a classification '
                'needs classes (to predict numbers, use a CSV "target" column or a float y)'
            )
        self.values.add(label)


_TYPE_NAMES = {str: "a string", int: "an integer"}


def label_stats(values: Iterable[Label]) -> dict[str, Any]:
    """A classification file's stats: how many classes, and (some of) their labels."""
    labels = sorted(values)  # one type, checked by LabelSet
    return {"classes": len(labels), "labels": labels[:MAX_LISTED_LABELS]}


# The roles a chat message may have. A tool's answer (and an assistant's tool call) needs
# fields that templates render each their own way: not supported rather than half-rendered.
CHAT_ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = ("role", "content", "weight")
# Row keys that would change how a conversation renders; refused rather than ignored.
_UNSUPPORTED_CHAT_KEYS = ("tools", "functions", "parallel_tool_calls")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation. `weight` (OpenAI's, assistants only): 0 keeps the
    turn in the conversation but trains nothing on it."""

    role: str
    content: str
    weight: int = 1

    @property
    def trains(self) -> bool:
        return self.role == "assistant" and self.weight == 1


@dataclass(frozen=True)
class JsonlRow:
    """One JSONL line: `text` (text, labelled_text), `prompt` + `completion`, or
    `messages` (chat)."""

    kind: str
    text: str = ""
    prompt: str = ""
    completion: str = ""
    label: Label | None = None
    messages: tuple[ChatMessage, ...] = ()

    @property
    def loss_text(self) -> str:
        """The text the model is trained to produce: a completion, never its prompt; the
        assistant turns that train, never what they answer."""
        if self.kind == CHAT:
            return "".join(message.content for message in self.messages if message.trains)
        return self.completion if self.kind == PROMPT_COMPLETION else self.text

    @property
    def all_text(self) -> str:
        """Every text the row holds (a chat template adds its own around it)."""
        if self.kind == CHAT:
            return "".join(message.content for message in self.messages)
        return self.prompt + self.loss_text


_KIND_KEYS = {
    TEXT: '"text"',
    PROMPT_COMPLETION: '"prompt" and "completion"',
    LABELLED_TEXT: '"text" and "label"',
    CHAT: '"messages"',
}


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _string(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowProblem(f'missing "{key}"')
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(f'"{key}" must be a string, not {_json_type(value)}')
    if not value and not allow_empty:
        raise RowProblem(f'"{key}" is empty')
    return value


def _label(value: object) -> Label:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RowProblem(f'"label" must be an integer or a string, not {_json_type(value)}')
    if value == "":
        raise RowProblem('"label" is empty')
    return value


def _message(number: int, value: object) -> ChatMessage:
    """Message `number` (1-based) of a conversation."""
    if not isinstance(value, dict):
        raise RowProblem(f"message {number} must be an object, not {_json_type(value)}")
    unknown = [key for key in value if key not in _MESSAGE_KEYS]
    if unknown:
        raise RowProblem(
            f"message {number} has {_short(unknown[0])}: a message holds only "
            '"role", "content" and "weight" (tool calls are not supported)'
        )
    try:
        role = _string(value, "role")
        if role not in CHAT_ROLES:
            raise RowProblem(f'unknown "role" {_short(role)}; known: {", ".join(CHAT_ROLES)}')
        # An assistant's turn is what trains: it must say something.
        content = _string(value, "content", allow_empty=role != "assistant")
        weight = value.get("weight", 1)
        if "weight" in value and role != "assistant":
            raise RowProblem('"weight" is for assistant messages only')
        if isinstance(weight, bool) or weight not in (0, 1):
            raise RowProblem(f'"weight" must be 0 or 1, not {json.dumps(weight)[:40]}')
    except RowProblem as problem:
        raise RowProblem(f"message {number}: {problem}") from None
    return ChatMessage(role, content, int(weight))


def _messages(row: dict[str, Any]) -> tuple[ChatMessage, ...]:
    value = row["messages"]
    if not isinstance(value, list):
        raise RowProblem(f'"messages" must be an array, not {_json_type(value)}')
    if not value:
        raise RowProblem('"messages" is empty')
    for key in _UNSUPPORTED_CHAT_KEYS:
        if key in row:
            raise RowProblem(f'"{key}" is not supported (conversations without tools only)')
    messages = tuple(_message(number, each) for number, each in enumerate(value, start=1))
    if not any(message.role == "assistant" for message in messages):
        raise RowProblem('no "assistant" message: nothing to train on')
    if not any(message.trains for message in messages):
        raise RowProblem('every assistant message has "weight" 0: nothing to train on')
    if messages[0].trains:
        # Its prompt would be an empty conversation, which templates do not render.
        raise RowProblem(
            "message 1: an assistant message that trains needs a message before it (what it "
            'answers): start with a system or user message, or give it "weight": 0'
        )
    return messages


def parse_jsonl_line(raw: bytes) -> JsonlRow | None:
    """One line of a JSONL file; None for a blank line. Raises RowProblem."""
    # A byte order mark, as some editors write at the start of a file.
    line = _utf8(raw).removeprefix("\ufeff")
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise RowProblem(f"bad JSON: {error.msg} at column {error.colno}") from None
    except RecursionError:
        raise RowProblem("bad JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise RowProblem(f"expected a JSON object, got {_json_type(value)}")
    if "messages" in value:
        return JsonlRow(CHAT, messages=_messages(value))
    # An empty prompt is allowed: the completion alone then carries the loss.
    if "prompt" in value or "completion" in value:
        return JsonlRow(
            PROMPT_COMPLETION,
            prompt=_string(value, "prompt", allow_empty=True),
            completion=_string(value, "completion"),
        )
    if "label" in value:
        return JsonlRow(LABELLED_TEXT, text=_string(value, "text"), label=_label(value["label"]))
    if "text" in value:
        return JsonlRow(TEXT, text=_string(value, "text"))
    keys = ", ".join(_short(key) for key in list(value)[:5]) or "none"
    raise RowProblem(
        f'missing "text" (or "prompt" and "completion", or "messages"); the keys are: {keys}'
    )


def read_jsonl(path: Path) -> Iterator[tuple[int, JsonlRow | RowProblem]]:
    """(line number, row or what is wrong with it) for every non-blank line, streamed.
    Every row must be of the kind of the first good one."""
    first: tuple[int, str] | None = None  # the first good row's line and kind
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                row = parse_jsonl_line(raw)
                if row is None:
                    continue
                if first is None:
                    first = (number, row.kind)
                elif row.kind != first[1]:
                    raise RowProblem(
                        f"has {_KIND_KEYS[row.kind]} but line {first[0]} has "
                        f"{_KIND_KEYS[first[1]]}: every line must hold the same kind of row"
                    )
            except RowProblem as problem:
                yield number, problem
                continue
            yield number, row


def _validate_jsonl(path: Path, problems: _Problems) -> tuple[str | None, dict[str, Any]]:
    kind: str | None = None
    rows = tokens = max_row_bytes = 0
    labels = LabelSet()
    for number, row in read_jsonl(path):
        rows += 1
        try:
            if isinstance(row, RowProblem):
                raise row
            kind = row.kind  # the same on every good line
            if row.label is not None:
                labels.add(row.label, number)
        except RowProblem as problem:
            problems.add(f"line {number}: {problem}")
            continue
        loss_bytes = len(row.loss_text.encode("utf-8"))
        tokens += loss_bytes
        max_row_bytes = max(max_row_bytes, len(row.all_text.encode("utf-8")))
    if rows == 0:
        problems.add("the file has no rows (only blank lines)")
    stats: dict[str, Any] = {"rows": rows, "tokens": tokens, "max_row_bytes": max_row_bytes}
    if kind == LABELLED_TEXT:
        stats |= label_stats(labels.values)
    return kind, stats


@dataclass(frozen=True)
class CsvLayout:
    """What a CSV header says: its columns, which are features, which is the target."""

    kind: str
    columns: list[str]
    feature_columns: list[int]
    target_column: int


def parse_csv_header(cells: list[str]) -> CsvLayout:
    names = [cell.strip() for cell in cells]
    for index, name in enumerate(names):
        if not name:
            raise RowProblem(f"column {index + 1} of the header has no name")
        if names.index(name) != index:
            raise RowProblem(f"column {_short(name)} appears twice in the header")
    has_label, has_target = "label" in names, "target" in names
    if has_label and has_target:
        raise RowProblem(
            'the header has both "label" and "target": keep "label" for classification '
            'or "target" for regression'
        )
    if not has_label and not has_target:
        header = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
        raise RowProblem(
            'missing a "label" column (classification) or a "target" column (regression); '
            f"the header is: {header}"
        )
    target = names.index("label" if has_label else "target")
    features = [index for index in range(len(names)) if index != target]
    if not features:
        raise RowProblem(f"no feature columns besides {_short(names[target])}")
    return CsvLayout(CLASSIFICATION if has_label else REGRESSION, names, features, target)


def _number(cell: str, layout: CsvLayout, index: int) -> float:
    where = f"column {index + 1} ({_short(layout.columns[index])})"
    try:
        value = float(cell)
    except ValueError:
        raise RowProblem(f"{where} is not a number: {_short(cell)}") from None
    if math.isnan(value):
        raise RowProblem(f"{where} is NaN")
    if math.isinf(value):
        raise RowProblem(f"{where} is infinite")
    return value


def parse_csv_row(layout: CsvLayout, cells: list[str]) -> tuple[list[float], str | float]:
    """(features, raw label or numeric target) of one data row. Raises RowProblem."""
    if len(cells) != len(layout.columns):
        raise RowProblem(f"{len(cells)} columns, but the header has {len(layout.columns)}")
    features = [_number(cells[index], layout, index) for index in layout.feature_columns]
    if layout.kind == REGRESSION:
        return features, _number(cells[layout.target_column], layout, layout.target_column)
    label = cells[layout.target_column].strip()
    if not label:
        raise RowProblem('"label" is empty')
    return features, label


def _utf8_lines(handle: IO[bytes]) -> Iterator[str]:
    """Lines decoded one at a time, so a bad byte is reported at its own line."""
    for number, raw in enumerate(handle, start=1):
        try:
            line = _utf8(raw)
        except RowProblem as problem:
            raise RowProblem(f"line {number}: {problem}") from None
        yield line.removeprefix("\ufeff") if number == 1 else line


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of every non-blank row, streamed; `line` is the row's last line as an
    editor shows it. Raises RowProblem (with its line) for a file that cannot be read on:
    bad UTF-8, a malformed quote."""
    with path.open("rb") as handle:
        reader = csv.reader(_utf8_lines(handle))
        try:
            for cells in reader:
                if cells:  # not a blank line
                    yield reader.line_num, cells
        except csv.Error as error:
            raise RowProblem(f"line {reader.line_num}: {error}") from None


def read_csv(path: Path) -> tuple[CsvLayout, Iterator[tuple[int, list[str]]]]:
    """The header's layout, and (line, cells) of the data rows after it, streamed.
    RowProblem for an empty file or a bad header."""
    rows = _csv_rows(path)
    for line, cells in rows:
        try:
            return parse_csv_header(cells), rows
        except RowProblem as problem:
            raise RowProblem(f"line {line}: {problem}") from None
    raise RowProblem("the file is empty")


def _validate_csv(path: Path, problems: _Problems) -> tuple[str | None, dict[str, Any]]:
    rows = 0
    raw_labels = LabelSet()
    layout: CsvLayout | None = None
    try:
        layout, lines = read_csv(path)
        for line, cells in lines:
            rows += 1
            try:
                _, target = parse_csv_row(layout, cells)
                if isinstance(target, str):
                    raw_labels.add(target, line)
            except RowProblem as problem:
                problems.add(f"line {line}: {problem}")
    except RowProblem as problem:
        problems.add(str(problem))
    if layout is None:
        return None, {"rows": rows}
    if rows == 0 and problems.count == 0:
        problems.add("the file has a header but no rows")
    stats: dict[str, Any] = {"rows": rows, "input_shape": [len(layout.feature_columns)]}
    if layout.kind == CLASSIFICATION:
        labels = [str(label) for label in raw_labels.values]
        try:  # integers when every label reads as one (as load reads them), else the strings
            stats |= label_stats([int(label) for label in labels])
        except ValueError:
            stats |= label_stats(labels)
    else:
        stats["target_size"] = 1
    return layout.kind, stats


# What reading a damaged, truncated, encrypted or exotically compressed zip can raise.
DAMAGED_ARCHIVE = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
)


@dataclass(frozen=True)
class NpyArray:
    """An array's header, and the stream positioned at its data."""

    name: str
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype[Any]
    stream: IO[bytes]

    @property
    def size_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@contextmanager
def open_npy(archive: zipfile.ZipFile, name: str) -> Iterator[NpyArray]:
    """An array, its header read. Unpickles nothing, and decompresses only the header:
    RowProblem when the array declares more bytes than its compressed size can honestly
    hold (MAX_NPZ_EXPANSION)."""
    member = f"{name}.npy"
    with archive.open(member) as stream:
        try:
            version = npy_format.read_magic(stream)
            read_header = npy_format.read_array_header_2_0
            if version == (1, 0):
                read_header = npy_format.read_array_header_1_0
            shape, fortran_order, dtype = read_header(stream)
        except ValueError as error:
            raise RowProblem(f"array {name!r} is not a valid .npy array ({error})") from None
        header = NpyArray(name, tuple(shape), fortran_order, dtype, stream)
        # The zip's directory is the uploader's word; the file's size is not.
        compressed = archive.getinfo(member).compress_size
        if archive.filename is not None:
            compressed = min(compressed, os.path.getsize(archive.filename))
        if header.size_bytes > MAX_NPZ_EXPANSION * max(compressed, 1):
            raise RowProblem(
                f"array {name!r} declares {header.size_bytes:,} bytes (shape "
                f"{header.shape}, {dtype}) in {compressed:,} compressed bytes, more than "
                f"{MAX_NPZ_EXPANSION}× its size: refused unread. If the data really is that "
                "repetitive, save it uncompressed (numpy.savez)"
            )
        yield header


@contextmanager
def open_xy(archive: zipfile.ZipFile) -> Iterator[tuple[str, NpyArray, NpyArray]]:
    """(kind, x, y) of an NPZ data set, once their headers are checked: numbers, one row
    of x per value (or row) of y."""
    names = sorted(name[:-4] for name in archive.namelist() if name.endswith(".npy"))
    missing = [name for name in ("x", "y") if name not in names]
    if missing:
        held = ", ".join(repr(name) for name in names[:20]) or "no arrays"
        raise RowProblem(f"missing array {' and '.join(map(repr, missing))}; it holds: {held}")
    with open_npy(archive, "x") as x, open_npy(archive, "y") as y:
        _check_numbers(x)
        if len(x.shape) < 2:
            raise RowProblem(
                f"array 'x' must have one row per sample (at least 2 dimensions: N×…), "
                f"not shape {x.shape}"
            )
        if math.prod(x.shape[1:]) == 0:
            raise RowProblem(f"array 'x' has no values per row (shape {x.shape})")
        kind = npz_kind(y)
        if x.shape[0] != y.shape[0]:
            raise RowProblem(f"'x' has {x.shape[0]} rows but 'y' has {y.shape[0]}")
        yield kind, x, y


def npy_chunks(array: NpyArray) -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
    """(offset, values) of the array's values in the order they are stored, SCAN_ELEMENTS
    at a time (1-D): memory bounded whatever the array's size."""
    total = math.prod(array.shape)
    for start in range(0, total, SCAN_ELEMENTS):
        count = min(SCAN_ELEMENTS, total - start)
        data = array.stream.read(count * array.dtype.itemsize)
        if len(data) != count * array.dtype.itemsize:
            raise RowProblem(f"array {array.name!r} is truncated")
        yield start, np.frombuffer(data, dtype=array.dtype)


def read_npy_as(array: NpyArray, dtype: type[Any]) -> np.ndarray[Any, Any]:
    """The whole array converted to `dtype`, filled a chunk at a time: one array of the
    result's size, never the file's bytes and a converted copy side by side."""
    order: Literal["F", "C"] = "F" if array.fortran_order else "C"
    result: np.ndarray[Any, Any] = np.empty(array.shape, dtype=dtype, order=order)
    flat = result.reshape(-1, order=order)  # a view, in the order the values are stored
    for start, chunk in npy_chunks(array):
        flat[start : start + len(chunk)] = chunk
    return result


def npz_kind(y: NpyArray) -> str:
    """classification for integer y (one class per row), regression for float y."""
    if not y.dtype.hasobject and y.dtype.kind not in "biuf":
        raise RowProblem(
            f"'y' must hold integer classes (classification) or float targets (regression), "
            f"not {y.dtype}"
        )
    _check_numbers(y)
    if y.dtype.kind in "biu":
        if len(y.shape) != 1:
            raise RowProblem(f"integer 'y' (classes) must be 1-D, not shape {y.shape}")
        return CLASSIFICATION
    if len(y.shape) not in (1, 2):
        raise RowProblem(f"float 'y' (targets) must be N or N×targets, not shape {y.shape}")
    return REGRESSION


def _check_numbers(array: NpyArray) -> None:
    if array.dtype.hasobject:
        raise RowProblem(
            f"array {array.name!r} holds Python objects (dtype object), which are never "
            "unpickled: save numbers"
        )
    if array.dtype.kind not in "biuf":
        raise RowProblem(f"array {array.name!r} must hold numbers, not {array.dtype}")
    if array.size_bytes > MAX_ARRAY_BYTES:
        raise RowProblem(
            f"array {array.name!r} unpacks to {array.size_bytes:,} bytes; "
            f"the limit is {MAX_ARRAY_BYTES:,}"
        )


def _check_finite(array: NpyArray, problems: _Problems) -> None:
    """Report the first row (1-based) that holds NaN or inf, reading a chunk at a time."""
    rows, row_size = array.shape[0], math.prod(array.shape[1:])
    for start, chunk in npy_chunks(array):
        bad = np.flatnonzero(~np.isfinite(chunk))
        if len(bad):
            element = start + int(bad[0])
            row = element % rows if array.fortran_order else element // row_size
            problems.add(f"{array.name!r} has NaN or infinite values in row {row + 1}")
            return


def distinct_classes(
    chunks: Iterable[np.ndarray[Any, Any]], limit: float = math.inf
) -> list[int] | None:
    """An integer y's distinct classes, sorted, from its chunks; None as soon as there are
    more than `limit` (never a sorted copy of the whole y)."""
    classes: set[int] = set()
    for chunk in chunks:
        classes.update(np.unique(chunk).tolist())
        if len(classes) > limit:
            return None
    return sorted(classes)


def _validate_npz(path: Path, problems: _Problems) -> tuple[str | None, dict[str, Any]]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        problems.add("not an NPZ archive (numpy.savez writes one: a zip of .npy arrays)")
        return None, {"rows": 0}
    try:
        with archive, open_xy(archive) as (kind, x, y):
            if x.shape[0] == 0:
                raise RowProblem("'x' and 'y' have no rows")
            stats: dict[str, Any] = {"rows": int(x.shape[0]), "input_shape": list(x.shape[1:])}
            if x.dtype.kind == "f":
                _check_finite(x, problems)
            if kind == REGRESSION:
                _check_finite(y, problems)
                return kind, stats | {"target_size": 1 if len(y.shape) == 1 else int(y.shape[1])}
            classes = distinct_classes((chunk for _, chunk in npy_chunks(y)), MAX_CLASSES)
    except RowProblem as problem:
        problems.add(str(problem))
        return None, {"rows": 0}
    except DAMAGED_ARCHIVE as error:
        problems.add(f"the archive is damaged ({error})")
        return None, {"rows": 0}
    if classes is None:
        problems.add(
            f"'y' has more than {MAX_CLASSES:,} distinct classes: to predict numbers, "
            "save 'y' as floats"
        )
        return kind, stats
    return kind, stats | label_stats(classes)
