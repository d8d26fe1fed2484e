"""Where the data stands, and how a window of m·k samples is cut into micro-batches.

The order of an epoch is a pure function of (seed, epoch), so a resumed run needs only
the epoch and the index into it to see exactly the samples it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, partial

import torch


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    index: int = 0  # samples of this epoch's order already trained on


@dataclass(frozen=True)
class Window:
    """The samples of one optimizer step."""

    epoch: int
    indices: list[int]

    def micro_batches(self, micro_batch_size: int) -> list[list[int]]:
        return [
            self.indices[start : start + micro_batch_size]
            for start in range(0, len(self.indices), micro_batch_size)
        ]


class WindowPlanner:
    """Hands out consecutive windows of an epoch's order, the last one possibly short."""

    def __init__(self, size: int, window_size: int, seed: int) -> None:
        self.size = size
        self.window_size = window_size
        # The current epoch's order, made once: each window is a slice of it.
        self._order = lru_cache(maxsize=1)(partial(epoch_order, size, seed))

    def window_at(self, position: DataPosition) -> Window:
        order = self._order(position.epoch)
        return Window(position.epoch, order[position.index : position.index + self.window_size])

    def advance(self, position: DataPosition, window: Window) -> DataPosition:
        index = position.index + len(window.indices)
        if index >= self.size:
            return DataPosition(epoch=position.epoch + 1, index=0)
        return replace(position, index=index)
