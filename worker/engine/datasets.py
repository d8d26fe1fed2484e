"""The built-in data sets: generated from the seed or shipped in this package."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import torch

from app.jobs.spec import DigitsSpec, SyntheticClassificationSpec, TinyTextSpec
from worker.engine.data_types import DataInfo, DataSplits, TensorSet, TokenSequenceSet

_DATA = files("worker.engine") / "data"


def _split_point(count: int, eval_fraction: float) -> int:
    return count - round(count * eval_fraction)


def _split_classification(
    features: torch.Tensor, labels: torch.Tensor, eval_fraction: float, seed: int, info: DataInfo
) -> DataSplits:
    # Shuffle once with the seed so the held-out split is not one class's tail.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    features, labels = features[order], labels[order]
    cut = _split_point(len(labels), eval_fraction)
    train = TensorSet(features[:cut], labels[:cut])
    held_out = TensorSet(features[cut:], labels[cut:]) if cut < len(labels) else None
    return DataSplits(train, held_out, info)


def synthetic_classification(spec: SyntheticClassificationSpec, seed: int) -> DataSplits:
    """Gaussian clusters around one random centre per class."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(spec.n_classes, spec.n_features, generator=generator) * 2.0
    labels = torch.randint(0, spec.n_classes, (spec.n_samples,), generator=generator)
    noise = torch.randn(spec.n_samples, spec.n_features, generator=generator) * spec.noise
    features = centres[labels] + noise
    info = DataInfo(input_shape=(spec.n_features,), num_classes=spec.n_classes)
    return _split_classification(features, labels, spec.eval_fraction, seed, info)


def digits(spec: DigitsSpec, seed: int) -> DataSplits:
    """The 1,797 8×8 handwritten digits (UCI), scaled to [0, 1], shaped 1×8×8."""
    with (_DATA / "digits.npz").open("rb") as handle, np.load(handle) as arrays:
        images = torch.from_numpy(arrays["images"].astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    info = DataInfo(input_shape=(1, 8, 8), num_classes=10)
    return _split_classification(images, labels, spec.eval_fraction, seed, info)


def tiny_text(spec: TinyTextSpec, seed: int) -> DataSplits:
    """The shipped corpus, character-level, cut into sequences of seeded random lengths.

    Token 0 is padding; characters are numbered from 1 in sorted order.
    """
    text = (_DATA / "tiny_text.txt").read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    encoded = torch.tensor([alphabet.index(char) + 1 for char in text], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    sequences, start = [], 0
    while len(encoded) - start >= spec.min_length:
        length = int(torch.randint(spec.min_length, spec.max_length + 1, (1,), generator=generator))
        piece = encoded[start : start + length]
        sequences.append(piece)
        start += len(piece)
    cut = _split_point(len(sequences), spec.eval_fraction)
    train = TokenSequenceSet(sequences[:cut])
    held_out = TokenSequenceSet(sequences[cut:]) if cut < len(sequences) else None
    info = DataInfo(vocab_size=len(alphabet) + 1, max_length=spec.max_length)
    return DataSplits(train, held_out, info)
