"""Deterministic kernels, for runs that must repeat bit for bit on a GPU.

On a CPU the engine's runs repeat bit for bit as they are. On CUDA some kernels (a
scatter-add in a backward pass, memory-efficient attention's backward) add in whatever
order their threads finish, so two runs of the same spec, and a resumed run and an
undisturbed one, may differ in the last bits. `TRAINJOB_DETERMINISTIC=true` on a worker
turns on PyTorch's deterministic algorithms for its jobs: slower, and an operation with
no deterministic version fails the job rather than silently differing.
"""

from __future__ import annotations

import os

import torch

# cuBLAS splits work across a workspace whose reuse order is not fixed unless its size
# is pinned; PyTorch refuses cuBLAS calls in deterministic mode without one of these.
CUBLAS_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def use_deterministic_algorithms() -> None:
    """Deterministic kernels in this process from now on. Call it before the first
    matrix product on the GPU: cuBLAS reads its workspace setting once, when the process
    first uses it. A workspace the operator set is kept."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC_WORKSPACES[0]
    torch.use_deterministic_algorithms(True)
