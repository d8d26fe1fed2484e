"""One window across the ranks of a process group: exact data-parallel accumulation.

The window (the same samples in the same order as on one device: its order depends on
the seed and the global batch, never on the number of ranks) is split into one
contiguous share per rank. Each rank accumulates its share's gradients with the loss
normalised by the WHOLE window's loss units, which every rank counts on the host from
its own copy of the data, so no collective is needed before the first backward. Then,
once per window:

1. one small all-reduce of a header: whether any rank ran out of memory, the loss sums,
   and which parameters hold a gradient anywhere (a rank with no samples holds none);
2. if any rank ran out of memory, every rank drops its gradients and raises
   `MicroBatchOutOfMemory` together, so that all adopt the same smaller micro-batch;
3. otherwise one all-reduce (SUM) of the gradients, in buckets. Each rank's gradient
   is its share of sum_loss / window_units, so their sum is the window's gradient as one
   device computes it. We do not wrap the model in DistributedDataParallel: its averaging
   over ranks (a ×N/N that is not exact in floating point), its Join for ranks without
   samples in a short window, and `no_sync` with `static_graph` (pytorch#187732) are all
   things to get right around it, while a summed all-reduce per window is the whole
   synchronisation accumulation needs.

After that every rank holds the same gradients, so clipping (the global norm), an fp16
overflow skip and the optimizer step are the same on every rank without more talk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.engine.data_types import SampleSet
from worker.engine.hooks import NO_HOOKS, Hooks
from worker.engine.window import (
    MicroBatchOutOfMemory,
    StepParts,
    WindowOutcome,
    accumulate_gradients,
    apply_update,
)

# Gradients are all-reduced in flat buckets of at most this many bytes: few collectives
# for many small parameters, and never a second copy of a large model's gradients.
BUCKET_BYTES = 32 * 1024 * 1024


class GroupBroken(Exception):
    """A collective failed: another rank died or its connection broke. Not the job's
    fault: the run is retried from its checkpoint, as after a lost worker."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    # gloo raises a plain RuntimeError ("Connection closed by peer") the moment a peer
    # is gone; NCCL a DistBackendError (a RuntimeError) once its watchdog gives up.
    try:
        yield
    except RuntimeError as error:
        raise GroupBroken(f"{what}: {error}") from error


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the default process group."""

    rank: int
    world_size: int
    # Where the ranks agree whether to stop (a gloo group of the same ranks): between two
    # windows, where the others may wait out rank 0's checkpoint save or progress writes,
    # longer than a window's collectives may take. None: the default group.
    between_windows: dist.ProcessGroup | None = None

    @classmethod
    def current(cls, between_windows: dist.ProcessGroup | None = None) -> RankGroup | None:
        """The initialised default group, or None for a run on one process."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(dist.get_rank(), dist.get_world_size(), between_windows)

    def share(self, indices: list[int]) -> list[int]:
        """This rank's contiguous part of a window: the first len % N ranks get one more
        sample; in a window shorter than the group the last ranks get none."""
        base, extra = divmod(len(indices), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return indices[start : start + base + (1 if self.rank < extra else 0)]

    def seed_window(self, seed: int, step: int) -> None:
        """Ranks other than 0 draw from a stream of their own for each window (dropout):
        sharing rank 0's, they would drop the same units for different samples, and a
        stream carried across windows could not be restored from rank 0's checkpoint.
        Rank 0 keeps the run's stream, which its checkpoints carry."""
        if self.rank:
            torch.manual_seed(((seed * 1_000_003 + self.rank) * 1_000_003 + step) % 2**63)

    def agree(self, stop_reason: str | None) -> str | None:
        """Rank 0's answer on every rank: whether to stop before the next window is one
        decision, or the ranks would wait on each other's collectives forever."""
        decision = [stop_reason]
        with _collective("agreeing whether to stop"):
            dist.broadcast_object_list(decision, src=0, group=self.between_windows)
        return decision[0]


def join_group(timeout: timedelta, between_windows: timedelta) -> RankGroup:
    """Join the group torch.distributed.run started this process in: NCCL when CUDA is
    there (each rank on its LOCAL_RANK-th device), else gloo; TRAINJOB_RANK_DEVICE=cpu
    keeps a CPU worker's ranks on gloo where CUDA exists too. A window's collectives
    fail after `timeout` (a hung rank ends the group), the stop decision between windows
    after `between_windows`. A dead rank ends the group at once either way: the launcher
    sees it exit."""
    cuda = os.environ.get("TRAINJOB_RANK_DEVICE") != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    group = RankGroup.current(dist.new_group(backend="gloo", timeout=between_windows))
    assert group is not None
    return group


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights and buffers on every rank: a model built from the seed is the same
    everywhere already, but one whose initialisation draws on anything else would not be."""
    with torch.no_grad(), _collective("broadcasting the weights"):
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (size + tensor.nbytes > BUCKET_BYTES or tensor.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.nbytes
    if bucket:
        yield bucket


def sum_gradients(gradients: list[torch.Tensor]) -> None:
    """Each gradient replaced by its sum over the ranks."""
    for bucket in _buckets(gradients):
        flat = torch.cat([gradient.flatten() for gradient in bucket])
        with _collective("summing the gradients"):
            dist.all_reduce(flat)
        offset = 0
        for gradient in bucket:
            gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()


def synchronise_window(
    parts: StepParts, loss_sum: torch.Tensor, out_of_memory: bool
) -> torch.Tensor:
    """The window's gradients and loss sum over every rank; raises MicroBatchOutOfMemory
    on every rank if any ran out of memory."""
    parameters = parts.parameters
    header = torch.zeros(2 + len(parameters), dtype=torch.float64, device=loss_sum.device)
    header[0] = float(out_of_memory)
    header[1] = loss_sum
    header[2:] = torch.tensor(
        [parameter.grad is not None for parameter in parameters], dtype=torch.float64
    )
    with _collective("summing the window's header"):
        dist.all_reduce(header)
    # The window's one host sync beyond apply_update's: which gradients exist anywhere.
    flags = header.tolist()
    if flags[0] > 0:
        parts.optimizer.zero_grad(set_to_none=True)
        raise MicroBatchOutOfMemory
    gradients = []
    for parameter, anywhere in zip(parameters, flags[2:], strict=True):
        if not anywhere:
            continue  # no rank used it: no gradient, as on one device (AdamW skips it)
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        gradients.append(parameter.grad)
    sum_gradients(gradients)
    return header[1]


def run_window_on_ranks(
    parts: StepParts,
    data: SampleSet,
    window: list[int],
    micro_batch_size: int,
    group: RankGroup,
    hooks: Hooks = NO_HOOKS,
) -> WindowOutcome:
    """run_window for one rank of a group: the same outcome on every rank."""
    window_units = data.loss_units(window)
    share = group.share(window)
    micro_batches = [
        share[start : start + micro_batch_size] for start in range(0, len(share), micro_batch_size)
    ]
    out_of_memory = False
    try:
        loss_sum, _ = accumulate_gradients(parts, data, micro_batches, hooks, window_units)
    except MicroBatchOutOfMemory:
        # Told to the others in the header: every rank must reach the same collectives.
        loss_sum, out_of_memory = torch.zeros((), dtype=torch.float64), True
    loss_sum = synchronise_window(parts, loss_sum.to(parts.precision.device), out_of_memory)
    return apply_update(parts, loss_sum, window_units, hooks)
