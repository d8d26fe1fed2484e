"""Where a caller can step into the loop: the points tests inject faults at.

Each hook runs where a real fault would strike, so that an injected out-of-memory error
takes the same path as one from the device (worker/faults.py, the engine's tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker.engine.data_types import Batch

# Called with a batch's size and the batch itself (on the device, which it may change).
BatchHook = Callable[[int, Batch], None]


@dataclass(frozen=True)
class Hooks:
    # Before each training micro-batch's forward pass.
    before_forward: BatchHook | None = None
    # Inside each training micro-batch's backward pass, once the gradient of its outputs
    # is being computed: the graph is alive and half walked.
    in_backward: BatchHook | None = None
    # Just before the optimizer step: the step that allocates an optimizer's state on its
    # first call.
    before_step: Callable[[], None] | None = None
    # Before each evaluation batch's forward pass.
    before_evaluation: BatchHook | None = None


NO_HOOKS = Hooks()
