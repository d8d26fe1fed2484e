"""Checkpoints: weights as safetensors, everything else in a weights-only torch file.

A run hands out a `LiveCheckpoint`, whose two parts are serialised straight from the
model and the optimizer into a sink (a file, the service's store); a stored one comes
back as a `Checkpoint` of bytes to resume from. Loading never unpickles arbitrary
objects: `torch.load(weights_only=True)` admits tensors and plain containers only.
"""

from __future__ import annotations

import io
import json
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from worker.engine.errors import TrainingError

if TYPE_CHECKING:
    from worker.engine.lora import MergedWeights

STATE_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
# A LoRA job's final checkpoint: the base model with its adapters merged in.
MERGED_FILE = "merged.safetensors"


class Sink(Protocol):
    """Where a part is written: a binary file, or the service's checkpoint store."""

    def write(self, data: bytes | memoryview, /) -> int: ...

    def flush(self) -> None: ...


@dataclass(eq=False, kw_only=True)
class LiveCheckpoint:
    """A checkpoint of the run in progress, handed to `on_checkpoint`.

    Its parts are serialised only when written, tensor by tensor from the live model and
    optimizer into a sink: a save holds no copy of the weights or the optimizer state
    (the bytes of both, and a chunked copy of them, used to take three times their size).
    They can be written during `on_checkpoint` only: then the run trains on, and the
    checkpoint lets go of its tensors (`release`); writing it later raises.

    A LoRA job's weights are its adapter's, with `weights_metadata` saying how to load
    them; its final checkpoint has a third part, `merged` (worker/engine/lora.py).
    """

    step: int
    weights: InitVar[dict[str, torch.Tensor]]
    state: InitVar[dict[str, Any]]
    loss: float | None
    # Of the last evaluation at or before `step`: what `keep_checkpoints.best` ranks by.
    eval_loss: float | None
    merged: InitVar[MergedWeights | None] = None
    # Beside the step, in the weights' safetensors metadata.
    weights_metadata: dict[str, str] = field(default_factory=dict)
    size_bytes: int = field(init=False, default=0)  # of the parts written so far
    has_merged: bool = field(init=False, default=False)

    def __post_init__(
        self,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        merged: MergedWeights | None,
    ) -> None:
        self._held: tuple[dict[str, torch.Tensor], dict[str, Any], MergedWeights | None] | None = (
            weights,
            state,
            merged,
        )
        self.has_merged = merged is not None

    def write_weights(self, sink: Sink) -> int:
        weights, _, _ = self._parts()
        metadata = {"step": str(self.step), **self.weights_metadata}
        written = write_safetensors(weights, metadata, sink)
        self.size_bytes += written
        return written

    def write_merged(self, sink: Sink) -> int:
        """The merged weights, a merged tensor at a time; only when `has_merged`."""
        _, _, merged = self._parts()
        if merged is None:
            raise RuntimeError(f"the checkpoint of step {self.step} has no merged weights")
        written = write_safetensors(
            merged.tensors, {"step": str(self.step)}, sink, merged.materialize
        )
        self.size_bytes += written
        return written

    def write_state(self, sink: Sink) -> int:
        _, state, _ = self._parts()
        counted = _CountingSink(sink)
        torch.save({"format": STATE_FORMAT, **state}, counted)  # type: ignore[arg-type]
        self.size_bytes += counted.size
        return counted.size

    def write(self, directory: Path) -> None:
        """Write both files, the state last: a directory with a state file is complete."""
        directory.mkdir(parents=True, exist_ok=True)
        parts = [(WEIGHTS_FILE, self.write_weights), (STATE_FILE, self.write_state)]
        if self.has_merged:
            parts.insert(1, (MERGED_FILE, self.write_merged))
        for name, write_part in parts:
            partial = directory / f".{name}.partial"
            with partial.open("wb") as handle:
                write_part(handle)
            partial.replace(directory / name)

    def release(self) -> None:
        self._held = None

    def _parts(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], MergedWeights | None]:
        if self._held is None:
            raise RuntimeError(
                f"the checkpoint of step {self.step} can be written during on_checkpoint only"
            )
        return self._held


class _CountingSink:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.size = 0

    def write(self, data: bytes | memoryview, /) -> int:
        self.size += len(memoryview(data).cast("B"))
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()


# safetensors' dtype names, in the order its writer sorts tensors by (its Rust enum,
# descending; then by name): write_safetensors makes the same bytes as its `save`.
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None,
    sink: Sink,
    materialize: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """The safetensors file of `tensors`, written tensor by tensor; its size.

    Hand-written because safetensors can only write a path or return the whole file as
    bytes, and a save must not hold the weights twice nor need a local disk. The format
    is its documented one: an 8-byte little-endian header length, a JSON header padded
    with spaces to 8 bytes, the tensors' bytes in header order.

    `materialize(name, tensor)`, if given, makes each tensor's bytes as it is written (a
    LoRA job's merged weights): of `tensor`'s shape and dtype, which the header gives."""
    ordered = sorted(tensors.items(), key=lambda item: (_DTYPE_RANK[item[1].dtype], item[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    sink.write(struct.pack("<Q", len(text)))
    sink.write(text)
    for name, tensor in ordered:
        if materialize is not None:
            tensor = materialize(name, tensor)
        # One tensor at a time on the CPU (a copy only if it is on a GPU or strided).
        cpu = tensor.detach().contiguous().cpu().reshape(-1)
        sink.write(cpu.view(torch.uint8).numpy().data)
    return 8 + len(text) + offset


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint's bytes, to resume from."""

    step: int
    weights: bytes  # safetensors
    state: bytes  # torch.save of plain containers and tensors
    loss: float | None = None
    # Of the last evaluation at or before `step`: what `keep_checkpoints.best` ranks by.
    eval_loss: float | None = None

    @classmethod
    def read(cls, directory: Path) -> Checkpoint:
        state = (directory / STATE_FILE).read_bytes()
        unpacked = unpack_state(state)
        return cls(
            step=int(unpacked["step"]),
            weights=(directory / WEIGHTS_FILE).read_bytes(),
            state=state,
            eval_loss=unpacked.get("eval_loss"),
        )


def weights_to_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    tensors = {
        name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
    }
    return save_safetensors(tensors, metadata=metadata)


def load_weights(model: nn.Module, weights: bytes) -> None:
    model.load_state_dict(load_safetensors(weights))


def unpack_state(content: bytes) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: say so rather than crash
        raise TrainingError(
            "incompatible_checkpoint", f"cannot read checkpoint state: {error}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError("incompatible_checkpoint", "checkpoint state has an unknown format")
    return state


def capture_rng() -> dict[str, Any]:
    # (kind, keys, position, has_gauss, cached_gaussian)
    kind, keys, *scalars = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy arrays are not weights-only loadable; keep the key words as a tensor.
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), *scalars),
        "torch": torch.get_rng_state(),
        # One state per visible device, once the run has used CUDA: a run on the CPU
        # draws nothing from them, and asking would start CUDA in a CPU job's process.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *scalars = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *scalars))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # Only the devices this process sees: a run checkpointed where more were visible
        # (rank 0 of a group sees every device of the group) resumes on fewer. A run uses
        # the first of them, so its own stream comes back; set_rng_state_all would fail
        # on the first device that is not there.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
