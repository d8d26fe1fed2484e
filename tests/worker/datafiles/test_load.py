"""Loading each kind of file into the engine's sample sets: tokens, loss units, classes,
held-out splits, and the checks between a training and a validation file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.jobs.spec import FileDatasetSpec
from worker.datafiles.load import FileSource, file_format, load_file_dataset
from worker.datafiles.tokenizers import ByteTokenizer
from worker.engine.data_types import (
    IGNORE_INDEX,
    DataInfo,
    TensorSet,
    TextClassificationSet,
    TokenSequenceSet,
)
from worker.engine.errors import TrainingError
from worker.engine.packing import PackedSequenceSet

TRAIN_ID = "file_" + "a" * 24
VALIDATION_ID = "file_" + "b" * 24


class Files:
    """A dict-backed FileSource: files written to tmp_path under their ids."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.paths: dict[str, Path] = {}

    def __call__(self, file_id: str) -> Path:
        return self.paths[file_id]

    def write(self, file_id: str, format: str, content: str | bytes) -> None:
        path = self.directory / f"{file_id}.{format}"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        self.paths[file_id] = path

    def jsonl(self, file_id: str, rows: list[dict[str, Any]]) -> None:
        self.write(file_id, "jsonl", "".join(json.dumps(row) + "\n" for row in rows))

    def npz(self, file_id: str, **arrays: Any) -> None:
        path = self.directory / f"{file_id}.npz"
        np.savez(path, **arrays)
        self.paths[file_id] = path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def load(files: FileSource, model_tokenizer: Any = None, **spec: Any) -> Any:
    """The file's splits; every row trains unless the test holds some out."""
    spec = {"eval_fraction": 0, **spec}
    return load_file_dataset(FileDatasetSpec(file_id=TRAIN_ID, **spec), 0, files, model_tokenizer)


def byte_ids(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


# ---------------------------------------------------------------- text


def test_text_is_byte_tokenized_and_cut_to_max_length(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "hello"}, {"text": "a much longer line"}, {"text": "é"}])
    data = load(files, max_length=6)
    assert isinstance(data.train, TokenSequenceSet)
    assert [s.tolist() for s in data.train.sequences] == [
        byte_ids("hello"),
        byte_ids("a much"),
        byte_ids("é"),  # two bytes: one target
    ]
    assert data.eval is None
    assert data.info == DataInfo(vocab_size=257, max_length=6, pad_id=0)
    assert data.train.loss_units([0, 1, 2]) == 4 + 5 + 1


def test_a_text_of_one_token_is_skipped(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "a"}, {"text": "ab"}])
    data = load(files)
    assert len(data.train) == 1


def test_a_file_with_nothing_to_predict_is_invalid_data(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "a"}, {"text": "b"}])
    with pytest.raises(TrainingError) as failure:
        load(files)
    assert failure.value.type == "invalid_data"
    assert TRAIN_ID in failure.value.message


def test_char_tokenizer_is_built_from_the_training_file_only(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "abba"}, {"text": "cab"}])
    files.jsonl(VALIDATION_ID, [{"text": "abz"}])
    data = load(files, tokenizer="char", validation_file_id=VALIDATION_ID)
    assert data.info.vocab_size == 2 + 3
    assert data.train.sequences[1].tolist() == [4, 2, 3]
    assert data.eval.sequences[0].tolist() == [2, 3, 1]  # z: unknown


def test_a_models_tokenizer_is_used_when_given(files: Files) -> None:
    class Words:
        vocab_size, pad_id = 10, 9

        def encode(self, text: str) -> list[int]:
            return [len(word) for word in text.split()]

    files.jsonl(TRAIN_ID, [{"text": "one three four"}])
    data = load(files, Words())
    assert data.train.sequences[0].tolist() == [3, 5, 4]
    assert (data.info.vocab_size, data.info.pad_id) == (10, 9)


def test_a_tokenizer_giving_ids_outside_its_vocabulary_is_refused(files: Files) -> None:
    class Broken:
        vocab_size, pad_id = 4, 0

        def encode(self, text: str) -> list[int]:
            return [1, 7]

    files.jsonl(TRAIN_ID, [{"text": "xy"}])
    with pytest.raises(TrainingError, match="token id 7 outside its vocabulary of 4"):
        load(files, Broken())


def test_eval_fraction_holds_out_a_seeded_shuffle_of_rows(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": f"row {index:02d}"} for index in range(20)])
    first = load(files, eval_fraction=0.25)
    again = load(files, eval_fraction=0.25)
    assert (len(first.train), len(first.eval)) == (15, 5)
    held = {bytes(s.tolist()) for s in first.eval.sequences}
    assert held == {bytes(s.tolist()) for s in again.eval.sequences}
    trained = {bytes(s.tolist()) for s in first.train.sequences}
    assert len(held | trained) == 20
    assert held != {bytes(byte_ids(f"row {index:02d}")) for index in range(15, 20)}


# ---------------------------------------------------------------- prompt / completion


def test_prompt_tokens_are_read_but_carry_no_loss(files: Files) -> None:
    files.jsonl(
        TRAIN_ID, [{"prompt": "ab", "completion": "cde"}, {"prompt": "", "completion": "xy"}]
    )
    data = load(files)
    assert data.train.sequences[0].tolist() == byte_ids("abcde")
    # Loss units: the completion's tokens; an empty prompt leaves the first token unpredicted.
    assert data.train.loss_units([0]) == 3
    assert data.train.loss_units([1]) == 1
    assert data.train.tokens([0, 1]) == 4 + 1
    batch = data.train.collate([0, 1])
    assert batch.inputs.tolist() == [byte_ids("abcd"), byte_ids("x") + [0] * 3]
    ignore = IGNORE_INDEX
    assert batch.targets.tolist() == [
        [ignore, *byte_ids("cde")],
        byte_ids("y") + [ignore] * 3,
    ]
    assert int((batch.targets != ignore).sum()) == data.train.loss_units([0, 1])


def test_a_completion_cut_away_by_max_length_skips_its_row(files: Files) -> None:
    files.jsonl(
        TRAIN_ID,
        [{"prompt": "abcd", "completion": "e"}, {"prompt": "ab", "completion": "cdef"}],
    )
    data = load(files, max_length=4)
    assert len(data.train) == 1
    assert data.train.sequences[0].tolist() == byte_ids("abcd")
    assert data.train.loss_units([0]) == 2


def test_packing_packs_both_splits_and_counts_every_row_as_unpacked(files: Files) -> None:
    rows = [{"prompt": "p" * (n % 3), "completion": "c" * (1 + n % 5)} for n in range(20)]
    files.jsonl(TRAIN_ID, rows)
    unpacked = load(files, max_length=8, eval_fraction=0.25)
    packed = load(files, max_length=8, eval_fraction=0.25, packing=True)
    assert isinstance(packed.train, PackedSequenceSet) and packed.info.packed
    assert isinstance(packed.eval, PackedSequenceSet)
    # The same rows held out, every row in one pack of at most max_length - 1 positions.
    for split in ("train", "eval"):
        rows_of, packs_of = getattr(unpacked, split), getattr(packed, split)
        assert [row.tolist() for row in packs_of.rows.sequences] == [
            row.tolist() for row in rows_of.sequences
        ]
        assert len(packs_of) < len(rows_of)
        assert sorted(row for pack in packs_of.packs for row in pack) == list(range(len(rows_of)))
        assert max(packs_of.tokens([index]) for index in range(len(packs_of))) <= 7
        everything = list(range(len(rows_of)))
        assert packs_of.loss_units(list(range(len(packs_of)))) == rows_of.loss_units(everything)


def test_packing_labelled_text_is_refused(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "good", "label": "pos"}, {"text": "no", "label": "neg"}])
    with pytest.raises(TrainingError, match="packs text, prompt/completion and chat rows") as error:
        load(files, packing=True)
    assert error.value.type == "invalid_spec"


# ---------------------------------------------------------------- labelled text


def test_labelled_text_pads_with_an_attention_mask_and_numbers_sorted_labels(
    files: Files,
) -> None:
    files.jsonl(
        TRAIN_ID,
        [{"text": "good", "label": "pos"}, {"text": "no", "label": "neg"}],
    )
    data = load(files)
    assert isinstance(data.train, TextClassificationSet)
    assert (data.info.num_classes, data.info.class_labels) == (2, ("neg", "pos"))
    batch = data.train.collate([0, 1])
    assert batch.targets.tolist() == [1, 0]
    assert batch.inputs.tolist() == [byte_ids("good"), [*byte_ids("no"), 0, 0]]
    assert batch.attention_mask is not None
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert data.train.loss_units([0, 1]) == 2


def test_a_validation_label_the_training_file_lacks_is_invalid_data(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    files.jsonl(VALIDATION_ID, [{"text": "c", "label": 3}, {"text": "d", "label": 1}])
    with pytest.raises(TrainingError) as failure:
        load(files, validation_file_id=VALIDATION_ID)
    assert failure.value.type == "invalid_data"
    assert failure.value.message == (
        f"file {VALIDATION_ID}: labels the training file does not have: 3"
    )


def test_a_validation_file_of_another_kind_is_invalid_data(files: Files) -> None:
    files.jsonl(TRAIN_ID, [{"text": "abc"}])
    files.jsonl(VALIDATION_ID, [{"prompt": "a", "completion": "bc"}])
    with pytest.raises(TrainingError, match="holds prompt_completion rows, but the training"):
        load(files, validation_file_id=VALIDATION_ID)


# ---------------------------------------------------------------- CSV and NPZ


def test_csv_classification_maps_sorted_labels_to_classes(files: Files) -> None:
    files.write(TRAIN_ID, "csv", "x,label,y\n1,10,2\n3,2,4\n5,10,6\n")
    data = load(files)
    assert isinstance(data.train, TensorSet)
    assert data.info == DataInfo(input_shape=(2,), num_classes=2, class_labels=(2, 10))
    assert data.train.features.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert data.train.targets.tolist() == [1, 0, 1]


def test_csv_validation_labels_are_read_the_way_the_training_files_are(files: Files) -> None:
    files.write(TRAIN_ID, "csv", "x,label\n1,0\n2,1\n")
    files.write(VALIDATION_ID, "csv", "x,label\n1,00\n2,1\n")
    data = load(files, validation_file_id=VALIDATION_ID)
    assert data.eval.targets.tolist() == [0, 1]
    files.write(VALIDATION_ID, "csv", "x,label\n1,0\n2,cat\n")
    with pytest.raises(TrainingError, match="labels the training file does not have: cat"):
        load(files, validation_file_id=VALIDATION_ID)


def test_csv_validation_file_with_other_columns_is_invalid_data(files: Files) -> None:
    files.write(TRAIN_ID, "csv", "x,label\n1,0\n2,1\n")
    files.write(VALIDATION_ID, "csv", "x,z,label\n1,2,0\n")
    with pytest.raises(
        TrainingError, match=r"rows of shape \[2\], but the training file's are \[1\]"
    ):
        load(files, validation_file_id=VALIDATION_ID)


def test_csv_regression_has_float_targets(files: Files) -> None:
    files.write(TRAIN_ID, "csv", "a,b,target\n1,2,0.5\n3,4,-1.5\n")
    data = load(files)
    assert isinstance(data.train, TensorSet)
    assert data.info == DataInfo(input_shape=(2,), target_size=1)
    batch = data.train.collate([1, 0])
    assert batch.targets.tolist() == [[-1.5], [0.5]]
    assert batch.targets.dtype == torch.float32
    assert batch.to(torch.device("cpu"), torch.float64).targets.dtype == torch.float64


def test_csv_row_problems_fail_with_their_line(files: Files) -> None:
    files.write(TRAIN_ID, "csv", "x,label\n1,0\nx,1\n")
    with pytest.raises(TrainingError) as failure:
        load(files)
    assert failure.value.type == "invalid_data"
    assert failure.value.message == f'file {TRAIN_ID}: line 3: column 1 ("x") is not a number: "x"'


def test_npz_images_with_a_held_out_split(files: Files) -> None:
    x = np.arange(10 * 1 * 2 * 2, dtype=np.float32).reshape(10, 1, 2, 2)
    files.npz(TRAIN_ID, x=x, y=np.array([5, 7] * 5))
    data = load(files, eval_fraction=0.2)
    assert data.info == DataInfo(input_shape=(1, 2, 2), num_classes=2, class_labels=(5, 7))
    assert (len(data.train), len(data.eval)) == (8, 2)
    held = data.eval.collate([0, 1])
    assert held.inputs.shape == (2, 1, 2, 2)
    # Each held-out image keeps its own class.
    for image, label in zip(held.inputs, held.targets, strict=True):
        row = int(image.flatten()[0]) // 4
        assert int(label) == row % 2


def test_npz_regression_keeps_float64_and_every_target(files: Files) -> None:
    files.npz(TRAIN_ID, x=np.ones((3, 2)), y=np.arange(6, dtype=np.float64).reshape(3, 2))
    data = load(files)
    assert data.info == DataInfo(input_shape=(2,), target_size=2)
    batch = data.train.collate([2])
    assert batch.targets.tolist() == [[4.0, 5.0]]
    assert batch.inputs.dtype == torch.float64


def test_format_is_read_from_the_name_or_else_the_first_bytes(tmp_path: Path) -> None:
    for name, content, expected in [
        ("a.JSONL", b"", "jsonl"),
        ("a.json", b"", "jsonl"),
        ("a.csv", b"", "csv"),
        ("a", b'\xef\xbb\xbf {"text": "x"}', "jsonl"),
        ("b", b"PK\x03\x04...", "npz"),
        ("c", b"x,label\n", "csv"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        assert file_format(path) == expected, name


def test_classes_come_from_the_whole_training_file_before_holding_out(files: Files) -> None:
    # One row per label: whichever rows are held out, their labels are still classes.
    files.jsonl(TRAIN_ID, [{"text": f"text {n}", "label": f"l{n}"} for n in range(10)])
    data = load(files, eval_fraction=0.3)
    assert data.info.num_classes == 10
    assert (len(data.train), len(data.eval)) == (7, 3)
    held = data.eval.collate([0, 1, 2])
    for tokens, label in zip(held.inputs, held.targets, strict=True):
        assert bytes(int(t) - 1 for t in tokens[:6]).decode() == f"text {int(label)}"


def test_a_damaged_npz_fails_as_invalid_data(files: Files) -> None:
    files.npz(TRAIN_ID, x=np.ones((50, 20)), y=np.zeros(50, dtype=np.int64))
    path = files.paths[TRAIN_ID]
    data = bytearray(path.read_bytes())
    data[200:260] = b"\x00" * 60
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingError) as failure:
        load(files)
    assert failure.value.type == "invalid_data"
