"""Validation: each error kind names its line or row, valid files report their stats, and
large files are streamed rather than read whole."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.datafiles.validate import (
    MAX_CLASSES,
    MAX_ERRORS,
    MAX_NPZ_EXPANSION,
    SCAN_ELEMENTS,
    ValidationReport,
    validate_file,
)


def jsonl(tmp_path: Path, *lines: Any, name: str = "data.jsonl") -> Path:
    """Objects are written as JSON; strings are written as they are (bad JSON on purpose)."""
    path = tmp_path / name
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def csv_file(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def npz(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def invalid(report: ValidationReport) -> str:
    assert report.status == "invalid", report
    return "\n".join(report.errors)


# ---------------------------------------------------------------- valid files


def test_text_jsonl_counts_rows_and_utf8_bytes_and_skips_blank_lines(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "héllo"}, "", {"text": "hi", "source": "extra keys ok"})
    report = validate_file(path, "jsonl")
    assert report == ValidationReport(
        "valid", "text", [], {"rows": 2, "tokens": 8, "max_row_bytes": 6}
    )


def test_prompt_completion_tokens_count_the_completion_only(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"prompt": "Q: 2+2? A:", "completion": " 4"},
        {"prompt": "", "completion": "free text"},
    )
    report = validate_file(path, "jsonl")
    assert report.status == "valid"
    assert report.kind == "prompt_completion"
    assert report.stats == {"rows": 2, "tokens": 2 + 9, "max_row_bytes": 12}


def test_labelled_text_lists_its_classes_sorted(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
        {"text": "fine", "label": "pos"},
    )
    report = validate_file(path, "jsonl")
    assert (report.status, report.kind) == ("valid", "labelled_text")
    assert report.stats == {
        "rows": 3,
        "tokens": 11,
        "max_row_bytes": 4,
        "classes": 2,
        "labels": ["neg", "pos"],
    }


def test_csv_classification_reads_integer_labels_as_numbers(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,b,label\n1,2,10\n3,4.5,2\n\n-1e3, 0 ,2\n")
    report = validate_file(path, "csv")
    assert report == ValidationReport(
        "valid",
        "classification",
        [],
        {"rows": 3, "input_shape": [2], "classes": 2, "labels": [2, 10]},
    )


def test_csv_classification_with_string_labels(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "label,x\ncat,1\ndog,2\n1,3\n")
    report = validate_file(path, "csv")
    assert report.stats["labels"] == ["1", "cat", "dog"]


def test_csv_regression_has_one_target(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "\ufeffx1,x2,target\n1,2,0.5\n3,4,-2\n")
    report = validate_file(path, "csv")
    assert report == ValidationReport(
        "valid", "regression", [], {"rows": 2, "input_shape": [2], "target_size": 1}
    )


def test_npz_images_with_integer_classes(tmp_path: Path) -> None:
    x = np.zeros((5, 1, 4, 4), dtype=np.float32)
    path = npz(tmp_path, x=x, y=np.array([3, 1, 1, 3, 7]))
    report = validate_file(path, "npz")
    assert report == ValidationReport(
        "valid",
        "classification",
        [],
        {"rows": 5, "input_shape": [1, 4, 4], "classes": 3, "labels": [1, 3, 7]},
    )


def test_npz_regression_with_several_targets(tmp_path: Path) -> None:
    path = npz(tmp_path, x=np.ones((4, 3)), y=np.zeros((4, 2), dtype=np.float32))
    report = validate_file(path, "npz")
    assert report == ValidationReport(
        "valid", "regression", [], {"rows": 4, "input_shape": [3], "target_size": 2}
    )


def test_compressed_npz_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez_compressed(path, x=np.ones((3, 2), dtype=np.float32), y=np.array([0, 1, 0]))
    assert validate_file(path, "npz").status == "valid"


# ---------------------------------------------------------------- JSONL errors


def test_bad_json_names_its_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "a"}, {"text": "b"}, '{"text": "c",}', {"text": "d"})
    report = validate_file(path, "jsonl")
    assert report.errors == [
        "line 3: bad JSON: Expecting property name enclosed in double quotes at column 14"
    ]
    assert report.stats == {"rows": 4}


def test_missing_text_names_its_line_and_keys(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "a"}, {"body": "b"})
    assert invalid(validate_file(path, "jsonl")) == (
        'line 2: missing "text" (or "prompt" and "completion", or "messages"); the keys are: "body"'
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": 5}, 'line 1: "text" must be a string, not a number'),
        ({"text": ""}, 'line 1: "text" is empty'),
        ({"prompt": "q", "completion": ""}, 'line 1: "completion" is empty'),
        ({"prompt": "q"}, 'line 1: missing "completion"'),
        ({"prompt": ["q"], "completion": "a"}, 'line 1: "prompt" must be a string, not an array'),
        (
            {"text": "t", "label": 1.5},
            'line 1: "label" must be an integer or a string, not a number',
        ),
        (
            {"text": "t", "label": True},
            'line 1: "label" must be an integer or a string, not true/false',
        ),
        (["text"], "line 1: expected a JSON object, got an array"),
    ],
)
def test_wrong_types_and_empty_texts_are_named(tmp_path: Path, row: Any, message: str) -> None:
    assert invalid(validate_file(jsonl(tmp_path, row), "jsonl")) == message


def test_mixed_kinds_name_the_line_that_differs(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"})
    assert invalid(validate_file(path, "jsonl")) == (
        'line 3: has "prompt" and "completion" but line 1 has "text": every line must hold '
        "the same kind of row"
    )


def test_mixed_label_types_are_refused(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"text": "a", "label": 1}, {"text": "b", "label": "one"})
    assert invalid(validate_file(path, "jsonl")) == (
        'line 2: "label" is a string but at line 1 it is an integer: use one type for every label'
    )


def test_bad_utf8_names_its_line_and_the_rest_is_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n{"nope": 1}\n')
    assert validate_file(path, "jsonl").errors == [
        "line 2: not valid UTF-8 (byte 0xff at byte 11)",
        'line 3: missing "text" (or "prompt" and "completion", or "messages"); '
        'the keys are: "nope"',
    ]


def test_only_blank_lines_is_no_data(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n  \n")
    assert invalid(validate_file(path, "jsonl")) == "the file has no rows (only blank lines)"


@pytest.mark.parametrize("format", ["jsonl", "csv", "npz"])
def test_empty_file(tmp_path: Path, format: str) -> None:
    path = tmp_path / f"data.{format}"
    path.write_bytes(b"")
    assert invalid(validate_file(path, format)) == "the file is empty"


def test_errors_stop_at_twenty_and_say_how_many_more(tmp_path: Path) -> None:
    path = jsonl(tmp_path, *(["not json"] * 25))
    errors = validate_file(path, "jsonl").errors
    assert len(errors) == MAX_ERRORS
    assert errors[0].startswith("line 1: bad JSON")
    assert errors[18].startswith("line 19: bad JSON")
    assert errors[-1] == "… and 6 more"


def test_unknown_format(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "x,label\n1,0\n")
    assert (
        invalid(validate_file(path, "parquet"))
        == "unknown format 'parquet'; known: jsonl, csv, npz"
    )


# ---------------------------------------------------------------- chat


USER = {"role": "user", "content": "2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


def test_chat_rows_count_the_bytes_of_the_assistant_turns_that_train(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"messages": [{"role": "system", "content": ""}, USER, ASSISTANT], "id": "extra ok"},
        {"messages": [USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "content": "still 4"}]},
    )
    report = validate_file(path, "jsonl")
    assert report == ValidationReport(
        "valid", "chat", [], {"rows": 2, "tokens": 1 + 7, "max_row_bytes": 4 + 1 + 4 + 7}
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": "hi"}, '"messages" must be an array, not a string'),
        ({"messages": []}, '"messages" is empty'),
        ({"messages": [USER, "hi"]}, "message 2 must be an object, not a string"),
        ({"messages": [{"content": "hi"}, ASSISTANT]}, 'message 1: missing "role"'),
        ({"messages": [{"role": 1, "content": "x"}]}, 'message 1: "role" must be a string'),
        ({"messages": [USER, {"role": "assistant"}]}, 'message 2: missing "content"'),
        (
            {"messages": [USER, {"role": "assistant", "content": None}]},
            'message 2: "content" must be a string, not null',
        ),
        (
            {"messages": [USER, {"role": "tool", "content": "x"}, ASSISTANT]},
            'message 2: unknown "role" "tool"; known: system, user, assistant',
        ),
        (
            {"messages": [USER, {**ASSISTANT, "tool_calls": []}]},
            'message 2 has "tool_calls": a message holds only "role", "content" and "weight"',
        ),
        ({"messages": [USER, {**ASSISTANT, "content": ""}]}, 'message 2: "content" is empty'),
        ({"messages": [USER, USER]}, 'no "assistant" message: nothing to train on'),
        (
            {"messages": [USER, {**ASSISTANT, "weight": 0}]},
            'every assistant message has "weight" 0',
        ),
        (
            {"messages": [USER, {**ASSISTANT, "weight": 0.5}]},
            'message 2: "weight" must be 0 or 1, not 0.5',
        ),
        (
            {"messages": [USER, {**ASSISTANT, "weight": True}]},
            'message 2: "weight" must be 0 or 1, not true',
        ),
        (
            {"messages": [{**USER, "weight": 1}, ASSISTANT]},
            'message 1: "weight" is for assistant messages only',
        ),
        ({"messages": [ASSISTANT, USER]}, "message 1: an assistant message that trains needs"),
        ({"messages": [USER, ASSISTANT], "tools": []}, '"tools" is not supported'),
    ],
)
def test_malformed_chat_rows_are_named_with_their_line(
    tmp_path: Path, row: Any, message: str
) -> None:
    path = jsonl(tmp_path, {"messages": [USER, ASSISTANT]}, "", row)
    assert f"line 3: {message}" in invalid(validate_file(path, "jsonl"))


def test_chat_rows_and_text_rows_do_not_mix(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"messages": [USER, ASSISTANT]}, {"text": "hi"})
    assert invalid(validate_file(path, "jsonl")) == (
        'line 2: has "text" but line 1 has "messages": every line must hold the same kind of row'
    )


# ---------------------------------------------------------------- CSV errors


def test_csv_without_label_or_target_names_the_header(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,b,class\n1,2,0\n")
    assert invalid(validate_file(path, "csv")) == (
        'line 1: missing a "label" column (classification) or a "target" column (regression); '
        "the header is: a, b, class"
    )


def test_csv_with_both_label_and_target_is_refused(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "x,label,target\n1,0,2.5\n")
    assert 'both "label" and "target"' in invalid(validate_file(path, "csv"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,y,label\n1,2,0\n3,abc,1\n", 'line 3: column 2 ("y") is not a number: "abc"'),
        ("x,y,label\n1,2,0\n\n3,,1\n", 'line 4: column 2 ("y") is not a number: ""'),
        ("x,y,label\n1,nan,0\n", 'line 2: column 2 ("y") is NaN'),
        ("x,y,target\n1,2,0\n-inf,2,1\n", 'line 3: column 1 ("x") is infinite'),
        ("x,y,target\n1,2,inf\n", 'line 2: column 3 ("target") is infinite'),
        ("x,y,label\n1,2,0\n1,2\n", "line 3: 2 columns, but the header has 3"),
        ("x,y,label\n1,2,0\n1,2,3,4\n", "line 3: 4 columns, but the header has 3"),
        ("x,label\n1, \n", 'line 2: "label" is empty'),
        ("x,x,label\n1,2,0\n", 'line 1: column "x" appears twice in the header'),
        ("label\n0\n", 'line 1: no feature columns besides "label"'),
        ("x,label\n", "the file has a header but no rows"),
    ],
)
def test_csv_errors_name_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    assert invalid(validate_file(csv_file(tmp_path, text), "csv")) == message


def test_csv_counts_a_quoted_newline_as_the_lines_it_spans(tmp_path: Path) -> None:
    path = csv_file(tmp_path, 'x,label\n1,"two\nlines"\nbad,0\n')
    assert invalid(validate_file(path, "csv")) == 'line 4: column 1 ("x") is not a number: "bad"'


def test_csv_bad_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"x,label\n1,a\n2,\xe9t\xe9\n")
    assert invalid(validate_file(path, "csv")) == "line 3: not valid UTF-8 (byte 0xe9 at byte 3)"


# ---------------------------------------------------------------- NPZ errors


def test_npz_missing_y_names_what_it_holds(tmp_path: Path) -> None:
    path = npz(tmp_path, x=np.ones((2, 2)), labels=np.zeros(2))
    assert invalid(validate_file(path, "npz")) == "missing array 'y'; it holds: 'labels', 'x'"


def test_npz_x_and_y_of_different_lengths(tmp_path: Path) -> None:
    path = npz(tmp_path, x=np.ones((5, 2)), y=np.zeros(4, dtype=np.int64))
    assert invalid(validate_file(path, "npz")) == "'x' has 5 rows but 'y' has 4"


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    x = np.array([{"a": 1}, {"b": 2}], dtype=object).reshape(2, 1)
    path = npz(tmp_path, x=x, y=np.zeros(2, dtype=np.int64))
    assert invalid(validate_file(path, "npz")) == (
        "array 'x' holds Python objects (dtype object), which are never unpickled: save numbers"
    )


def test_npz_nan_in_x_names_its_row(tmp_path: Path) -> None:
    x = np.zeros((6, 2, 3), dtype=np.float32)
    x[4, 1, 2] = np.nan
    path = npz(tmp_path, x=x, y=np.zeros(6, dtype=np.int64))
    assert invalid(validate_file(path, "npz")) == "'x' has NaN or infinite values in row 5"


def test_npz_inf_in_fortran_ordered_x_names_its_row(tmp_path: Path) -> None:
    x = np.asfortranarray(np.zeros((6, 3)))
    x[2, 1] = np.inf
    path = npz(tmp_path, x=x, y=np.zeros(6))
    assert invalid(validate_file(path, "npz")) == "'x' has NaN or infinite values in row 3"


def test_npz_nan_in_float_y_names_its_row(tmp_path: Path) -> None:
    path = npz(tmp_path, x=np.ones((3, 2)), y=np.array([0.0, np.nan, 1.0]))
    assert invalid(validate_file(path, "npz")) == "'y' has NaN or infinite values in row 2"


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.ones((3, 2)), np.zeros((3, 2), dtype=np.int64), "integer 'y' (classes) must be 1-D"),
        (np.ones((3, 2)), np.zeros((3, 2, 1)), "float 'y' (targets) must be N or N×targets"),
        (np.ones((3, 2)), np.array(["a", "b", "c"]), "'y' must hold integer classes"),
        (np.ones(3), np.zeros(3, dtype=np.int64), "array 'x' must have one row per sample"),
        (np.array([["a"], ["b"]]), np.zeros(2, dtype=np.int64), "array 'x' must hold numbers"),
        (np.ones((0, 2)), np.zeros(0, dtype=np.int64), "'x' and 'y' have no rows"),
    ],
)
def test_npz_shapes_and_dtypes(tmp_path: Path, x: Any, y: Any, message: str) -> None:
    assert invalid(validate_file(npz(tmp_path, x=x, y=y), "npz")).startswith(message)


def test_an_npz_array_that_unpacks_far_beyond_its_compressed_size_is_refused_unread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((100_000, 10), dtype=np.float32), y=np.zeros(100_000))
    message = invalid(validate_file(path, "npz"))
    assert message.startswith(
        "array 'x' declares 4,000,000 bytes (shape (100000, 10), float32) in "
    )
    assert message.endswith(
        f"more than {MAX_NPZ_EXPANSION}× its size: refused unread. If the data really is "
        "that repetitive, save it uncompressed (numpy.savez)"
    )


def test_the_same_zeros_saved_uncompressed_are_valid(tmp_path: Path) -> None:
    path = npz(tmp_path, x=np.zeros((100_000, 10), dtype=np.float32), y=np.zeros(100_000))
    assert validate_file(path, "npz").status == "valid"


def test_an_npz_y_with_too_many_classes_is_refused_reading_it_in_chunks(tmp_path: Path) -> None:
    rows = 3 * SCAN_ELEMENTS
    y = np.arange(rows, dtype=np.int64) % (MAX_CLASSES + 1)  # the last class comes late
    path = npz(tmp_path, x=np.zeros((rows, 1), dtype=np.int8), y=y)
    del y
    report, peak = traced_peak(path, "npz")
    assert report.errors == [
        f"'y' has more than {MAX_CLASSES:,} distinct classes: to predict numbers, save 'y' "
        "as floats"
    ]
    assert peak < 4 * 8 * SCAN_ELEMENTS, f"peak {peak:,} bytes for a y of {8 * rows:,}"


def test_a_file_that_is_not_a_zip_is_not_an_npz(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "x,label\n1,0\n", name="data.npz")
    assert invalid(validate_file(path, "npz")).startswith("not an NPZ archive")


# ---------------------------------------------------------------- streaming


def test_validation_never_imports_torch() -> None:
    code = "import sys, worker.datafiles.validate; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def traced_peak(path: Path, format: str) -> tuple[ValidationReport, int]:
    tracemalloc.start()
    try:
        report = validate_file(path, format)
        return report, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_jsonl_file_is_read_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "p" * 40, "completion": "c" * 60}) + "\n"
    with path.open("w") as handle:
        for _ in range(100_000):
            handle.write(line)
    size = path.stat().st_size
    assert size > 10_000_000
    report, peak = traced_peak(path, "jsonl")
    assert report.stats["rows"] == 100_000
    assert report.stats["tokens"] == 100_000 * 60
    assert peak < 1_000_000, f"peak {peak:,} bytes for a file of {size:,}"


def test_a_large_csv_file_is_read_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w") as handle:
        handle.write("a,b,c,d,label\n")
        for index in range(50_000):
            handle.write(f"{index},0.25,-1.5,3e2,{index % 7}\n")
    report, peak = traced_peak(path, "csv")
    assert report.stats == {
        "rows": 50_000,
        "input_shape": [4],
        "classes": 7,
        "labels": list(range(7)),
    }
    assert peak < 1_000_000, f"peak {peak:,} bytes for a file of {path.stat().st_size:,}"


def test_a_large_npz_x_is_scanned_in_chunks(tmp_path: Path) -> None:
    x = np.zeros((10_000, 1000), dtype=np.float32)  # 40 MB
    x[9_999, 999] = np.inf
    path = npz(tmp_path, x=x, y=np.zeros(10_000, dtype=np.int64))
    del x
    report, peak = traced_peak(path, "npz")
    assert report.errors == ["'x' has NaN or infinite values in row 10000"]
    assert peak < 12_000_000, f"peak {peak:,} bytes for an x of 40,000,000"


def test_csv_with_windows_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"x,label\r\n1,a\r\nzz,b\r\n")
    assert invalid(validate_file(path, "csv")) == 'line 3: column 1 ("x") is not a number: "zz"'


def test_a_damaged_npz_is_invalid(tmp_path: Path) -> None:
    path = npz(tmp_path, x=np.ones((50, 20)), y=np.zeros(50, dtype=np.int64))
    data = bytearray(path.read_bytes())
    data[200:260] = b"\x00" * 60
    path.write_bytes(bytes(data))
    assert invalid(validate_file(path, "npz")).startswith("the archive is damaged")
