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
    # Integer classes or tokens (cross-entropy), or float targets (squared error).
    targets: torch.Tensor
    # 1 for real tokens, 0 for padding, for models that read padded rows of text.
    attention_mask: torch.Tensor | None = None
    # Packed rows of text (worker/engine/packing.py): each token's position within its
    # row, restarting at 0 where a row starts, so that the model can keep rows apart.
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device, float_dtype: torch.dtype) -> Batch:
        return Batch(
            _to(self.inputs, device, float_dtype),
            _to(self.targets, device, float_dtype),
            None if self.attention_mask is None else _to(self.attention_mask, device, float_dtype),
            None if self.position_ids is None else _to(self.position_ids, device, float_dtype),
        )


def _to(tensor: torch.Tensor, device: torch.device, float_dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=float_dtype, non_blocking=True)
    return tensor.to(device=device, non_blocking=True)


class SampleSet(Protocol):
    """A split of a data set. Plugins return objects of this shape."""

    def __len__(self) -> int: ...

    def loss_units(self, indices: list[int]) -> int:
        """Samples (classification) or non-padding target tokens (language modelling)."""
        ...

    def tokens(self, indices: list[int]) -> int:
        """Tokens the model reads in these samples; 0 for data that has no tokens."""
        ...

    def collate(self, indices: list[int]) -> Batch: ...


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data to be built."""

    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    vocab_size: int | None = None
    max_length: int | None = None
    # Regression: the number of float targets per sample (the model's outputs).
    target_size: int | None = None
    # Text: the token that pads rows, for models that must recognise it.
    pad_id: int | None = None
    # Classification from a file: the label each class index stands for.
    class_labels: tuple[int | str, ...] | None = None
    # Text packed several rows to a sample: the model must keep them apart by position ids.
    packed: bool = False


@dataclass(frozen=True)
class DataSplits:
    train: SampleSet
    eval: SampleSet | None
    info: DataInfo


class TensorSet:
    """Features with integer class labels (cross-entropy) or float targets shaped
    N × target_size (squared error), held as two tensors; one loss unit per sample."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        if len(features) != len(targets):
            raise ValueError("features and targets differ in length")
        if targets.is_floating_point() and targets.dim() != 2:
            raise ValueError("float targets must be shaped N × target_size")
        self.features = features
        self.targets = targets if targets.is_floating_point() else targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def loss_units(self, indices: list[int]) -> int:
        return len(indices)

    def tokens(self, indices: list[int]) -> int:
        return 0

    def collate(self, indices: list[int]) -> Batch:
        index = torch.tensor(indices, dtype=torch.long)
        return Batch(self.features[index], self.targets[index])


class TokenSequenceSet:
    """Variable-length token sequences for next-token prediction, right-padded per batch.

    A sequence of n tokens gives n-1 (input, target) positions; padded positions get
    IGNORE_INDEX as target, so the loss units of a batch are its real target tokens.
    With `loss_starts` (prompt/completion), the tokens before a sequence's loss start
    (its prompt) are read but never predicted: their targets are IGNORE_INDEX too, and
    only the tokens from the loss start on are loss units. With `loss_masks` (chat: the
    assistant turns, wherever they are), a boolean per token says which are loss units;
    the first token never is (nothing comes before it).
    """

    def __init__(
        self,
        sequences: list[torch.Tensor],
        pad_id: int = 0,
        loss_starts: list[int] | None = None,
        loss_masks: list[torch.Tensor] | None = None,
    ) -> None:
        if loss_starts is not None and loss_masks is not None:
            raise ValueError("loss starts or loss masks, not both")
        loss_starts = [1] * len(sequences) if loss_starts is None else loss_starts
        if len(loss_starts) != len(sequences):
            raise ValueError("one loss start per sequence")
        # The first token has nothing before it to be predicted from.
        self.loss_starts = [max(1, start) for start in loss_starts]
        # Per position (token i+1 predicted from those up to i): the mask without its first.
        self.target_masks: list[torch.Tensor] | None = None
        if loss_masks is not None:
            if [len(mask) for mask in loss_masks] != [len(sequence) for sequence in sequences]:
                raise ValueError("one loss mask per sequence, of its length")
            self.target_masks = [mask[1:].bool() for mask in loss_masks]
            # Counted here, on the host: the window's normaliser, known before any backward.
            self.target_counts = [int(mask.sum()) for mask in self.target_masks]
        else:
            self.target_counts = [
                len(sequence) - start
                for sequence, start in zip(sequences, self.loss_starts, strict=True)
            ]
        if any(count <= 0 for count in self.target_counts):
            raise ValueError("every sequence needs at least one target token")
        # Any integer dtype: a file's tokens are kept compact and widened per batch.
        self.sequences = sequences
        self.input_counts = [len(sequence) - 1 for sequence in sequences]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def loss_units(self, indices: list[int]) -> int:
        return sum(self.target_counts[index] for index in indices)

    def tokens(self, indices: list[int]) -> int:
        return sum(self.input_counts[index] for index in indices)

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's inputs and targets, unpadded: what `collate` puts in its row."""
        sequence = self.sequences[index]
        return sequence[:-1].long(), self._targets(index)

    def _targets(self, index: int) -> torch.Tensor:
        # Position i predicts token i+1.
        following = self.sequences[index][1:].long()
        if self.target_masks is not None:
            return torch.where(self.target_masks[index], following, IGNORE_INDEX)
        targets = torch.full_like(following, IGNORE_INDEX)
        start = self.loss_starts[index]
        targets[start - 1 :] = following[start - 1 :]
        return targets

    def collate(self, indices: list[int]) -> Batch:
        inputs = _right_padded([self.sequences[index][:-1] for index in indices], self.pad_id)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        for row, index in enumerate(indices):
            targets[row, : self.input_counts[index]] = self._targets(index)
        return Batch(inputs, targets)


class TextClassificationSet:
    """Token sequences with one class label each, right-padded per batch with an
    attention mask; one loss unit per sample."""

    def __init__(self, sequences: list[torch.Tensor], labels: torch.Tensor, pad_id: int) -> None:
        if len(sequences) != len(labels):
            raise ValueError("sequences and labels differ in length")
        if any(len(sequence) == 0 for sequence in sequences):
            raise ValueError("every sequence needs at least one token")
        self.sequences = sequences
        self.lengths = [len(sequence) for sequence in sequences]
        self.labels = labels.long()
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def loss_units(self, indices: list[int]) -> int:
        return len(indices)

    def tokens(self, indices: list[int]) -> int:
        return sum(self.lengths[index] for index in indices)

    def collate(self, indices: list[int]) -> Batch:
        inputs = _right_padded([self.sequences[index] for index in indices], self.pad_id)
        lengths = torch.tensor([self.lengths[index] for index in indices])
        mask = (torch.arange(inputs.shape[1]) < lengths[:, None]).long()
        return Batch(inputs, self.labels[indices], attention_mask=mask)


def _right_padded(sequences: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """The sequences as rows of one long tensor, each padded on its right with pad_id."""
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id)
    return padded.long()
