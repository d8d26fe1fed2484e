"""Sequence packing: several rows of text in one sample, kept apart, counted as unpacked.

A pack is the concatenation of whole rows' (input, target) positions, at most
`capacity` of them (max_length - 1: what one unpacked row may have). Each row brings
exactly the positions and targets it has unpacked, its prompt's targets IGNORE_INDEX,
so no target crosses a row boundary, and a pack's loss units are its rows' target
tokens: a window's normaliser is the real target tokens of the rows in it, as unpacked.

Rows are kept apart by their position ids, which restart at 0 where each row starts:
the model attends only within a run of positions that starts at 0 (tiny-gpt's
block-diagonal mask; transformers builds the same from position ids). A pack shorter
than its micro-batch's longest is padded after its last row with a run of its own,
which predicts nothing.

Which rows share a pack is a function of the seed alone: the rows are shuffled with
it, then each goes into the fullest pack it still fits (best fit), or opens a new one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from worker.engine.data_types import IGNORE_INDEX, Batch, TokenSequenceSet


def pack_rows(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """The rows (indices into `lengths`, positions each) grouped into packs of at most
    `capacity` positions; every row in exactly one pack."""
    too_long = [length for length in lengths if length > capacity]
    if too_long:
        raise ValueError(f"a row of {max(too_long)} positions exceeds the capacity {capacity}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    packs: list[list[int]] = []
    # (free positions, pack index) of every pack with room left, sorted: the first entry
    # at or above a row's length is the fullest pack it fits, the earliest among equals.
    room: list[tuple[int, int]] = []
    for row in order:
        length = lengths[row]
        slot = bisect.bisect_left(room, (length, -1))
        if slot == len(room):
            packs.append([row])
            free, pack = capacity - length, len(packs) - 1
        else:
            free, pack = room.pop(slot)
            packs[pack].append(row)
            free -= length
        if free > 0:
            bisect.insort(room, (free, pack))
    return packs


class PackedSequenceSet:
    """The rows of a TokenSequenceSet packed by `pack_rows`: one sample per pack.

    A batch's packs are right-padded to its longest, with `position_ids` beside the
    inputs; its loss units and tokens are its rows', exactly as unpacked.
    """

    def __init__(self, rows: TokenSequenceSet, capacity: int, seed: int) -> None:
        self.rows = rows
        self.packs = pack_rows(rows.input_counts, capacity, seed)
        # Counted here, on the host, as TokenSequenceSet counts its rows.
        self.target_counts = [rows.loss_units(pack) for pack in self.packs]
        self.input_counts = [rows.tokens(pack) for pack in self.packs]

    def __len__(self) -> int:
        return len(self.packs)

    def loss_units(self, indices: list[int]) -> int:
        return sum(self.target_counts[index] for index in indices)

    def tokens(self, indices: list[int]) -> int:
        return sum(self.input_counts[index] for index in indices)

    def collate(self, indices: list[int]) -> Batch:
        width = max(self.input_counts[index] for index in indices)
        inputs = torch.full((len(indices), width), self.rows.pad_id, dtype=torch.long)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        positions = torch.empty_like(inputs)
        for batch_row, index in enumerate(indices):
            start = 0
            for row in self.packs[index]:
                row_inputs, row_targets = self.rows.row(row)
                end = start + len(row_inputs)
                inputs[batch_row, start:end] = row_inputs
                targets[batch_row, start:end] = row_targets
                positions[batch_row, start:end] = torch.arange(end - start)
                start = end
            # The padding: a run of positions of its own, so no row attends to it.
            positions[batch_row, start:] = torch.arange(width - start)
        return Batch(inputs, targets, position_ids=positions)
