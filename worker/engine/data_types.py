"""What a data set hands the engine: index-addressable samples with a known loss-unit count.

The window's normaliser must be known before its first backward, and reading it must
not touch the device: `loss_units` answers from host-side lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# Targets equal to this are padding: no loss, no gradient, not a loss unit.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device, float_dtype: torch.dtype) -> Batch:
        inputs = self.inputs
        if inputs.is_floating_point():
            inputs = inputs.to(device=device, dtype=float_dtype, non_blocking=True)
        else:
            inputs = inputs.to(device=device, non_blocking=True)
        return Batch(inputs, self.targets.to(device=device, non_blocking=True))


class SampleSet(Protocol):
    """A split of a data set. Plugins return objects of this shape."""

    def __len__(self) -> int: ...

    def loss_units(self, indices: list[int]) -> int:
        """Samples (classification) or non-padding target tokens (language modelling)."""
        ...

    def tokens(self, indices: list[int]) -> int:
        """Target tokens in these samples; 0 for data that has no tokens."""
        ...

    def collate(self, indices: list[int]) -> Batch: ...


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data to be built."""

    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    vocab_size: int | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class DataSplits:
    train: SampleSet
    eval: SampleSet | None
    info: DataInfo


class TensorClassificationSet:
    """Features and integer labels held as two tensors; one loss unit per sample."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if len(features) != len(labels):
            raise ValueError("features and labels differ in length")
        self.features = features
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def loss_units(self, indices: list[int]) -> int:
        return len(indices)

    def tokens(self, indices: list[int]) -> int:
        return 0

    def collate(self, indices: list[int]) -> Batch:
        index = torch.tensor(indices, dtype=torch.long)
        return Batch(self.features[index], self.labels[index])


class TokenSequenceSet:
    """Variable-length token sequences for next-token prediction, right-padded per batch.

    A sequence of n tokens gives n-1 (input, target) positions; padded positions get
    IGNORE_INDEX as target, so the loss units of a batch are its real target tokens.
    """

    def __init__(self, sequences: list[torch.Tensor], pad_id: int = 0) -> None:
        if any(len(sequence) < 2 for sequence in sequences):
            raise ValueError("every sequence needs at least two tokens")
        self.sequences = [sequence.long() for sequence in sequences]
        self.target_counts = [len(sequence) - 1 for sequence in sequences]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def loss_units(self, indices: list[int]) -> int:
        return sum(self.target_counts[index] for index in indices)

    def tokens(self, indices: list[int]) -> int:
        return self.loss_units(indices)

    def collate(self, indices: list[int]) -> Batch:
        width = max(self.target_counts[index] for index in indices)
        inputs = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for row, index in enumerate(indices):
            sequence = self.sequences[index]
            length = len(sequence) - 1
            inputs[row, :length] = sequence[:-1]
            targets[row, :length] = sequence[1:]
        return Batch(inputs, targets)
