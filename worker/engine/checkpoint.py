"""Checkpoints: weights as safetensors, everything else in a weights-only torch file.

Both halves are bytes, so the CLI can write them to a directory and the service can
store them in the database. Loading never unpickles arbitrary objects:
`torch.load(weights_only=True)` admits tensors and plain containers only.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from worker.engine.errors import TrainingError

STATE_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    weights: bytes  # safetensors
    state: bytes  # torch.save of plain containers and tensors
    loss: float | None = None
    # Of the last evaluation at or before `step`: what `keep_checkpoints.best` ranks by.
    eval_loss: float | None = None

    def write(self, directory: Path) -> None:
        """Write both files, the state last: a directory with a state file is complete."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in ((WEIGHTS_FILE, self.weights), (STATE_FILE, self.state)):
            partial = directory / f".{name}.partial"
            partial.write_bytes(content)
            partial.replace(directory / name)

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


def pack_state(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buffer)
    return buffer.getvalue()


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
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy arrays are not weights-only loadable; keep the key words as a tensor.
        "numpy": (
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
