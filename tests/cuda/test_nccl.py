"""Data parallelism on NCCL with two or more GPUs: the multi-device tests of
tests/worker/engine/test_distributed.py with each rank on its own GPU. A window of
m·k·N samples on N ranks ends at the weights and losses of one GPU training batches of
m·k·N (fp64, 1e-10, as on the CPU), through tail windows and an out-of-memory error on
one rank; a run checkpointed on two GPUs resumes on one."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from app.jobs.spec import JobSpec
from tests.cuda.lane import CUDA_LANE, FP64_TOLERANCE, flat_weights, relative_error
from tests.worker.engine.test_distributed import (
    CASES,
    MICRO,
    OUT_OF_MEMORY_RANK,
    STEPS,
    launch,
    out_of_memory_once,
    resume_spec,
    spec_for,
)
from worker.engine.checkpoint import Checkpoint, LiveCheckpoint
from worker.engine.distributed import join_group
from worker.engine.hooks import Hooks
from worker.engine.trainer import Callbacks, StepMetrics, train

pytestmark = [
    *CUDA_LANE,
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.device_count() < 2,
        reason="data parallelism on NCCL needs 2 or more CUDA devices",
    ),
]
WORLD_SIZE = 2
TIMEOUT = timedelta(seconds=120)


def on_cuda(spec: JobSpec) -> JobSpec:
    return spec.model_copy(update={"device": "cuda"})


def where_this_rank_runs() -> dict[str, Any]:
    return {
        "backend": dist.get_backend(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "device": torch.cuda.current_device(),
    }


def train_every_case_on_cuda(out_of_memory: bool) -> dict[str, Any]:
    """One rank: joins the group as a worker's rank does (join_group), trains every case."""
    group = join_group(TIMEOUT, TIMEOUT)
    try:
        results: dict[str, Any] = {"placement": where_this_rank_runs()}
        for case in CASES:
            metrics: list[StepMetrics] = []
            injected = out_of_memory and group.rank == OUT_OF_MEMORY_RANK
            result = train(
                on_cuda(spec_for(case, group.world_size, MICRO, STEPS)),
                Callbacks(on_step=metrics.append),
                hooks=out_of_memory_once() if injected else Hooks(),
                group=group,
            )
            results[case] = {
                "weights": flat_weights(result.model),
                "parameter_devices": {str(p.device) for p in result.model.parameters()},
                "losses": [m.loss for m in metrics],
                "micro": [m.micro_batch_size for m in metrics],
            }
        return results
    finally:
        dist.destroy_process_group()


def train_and_stop_on_cuda(directory: str, stop_after: int) -> int:
    """One rank of the resume spec on CUDA, stopped after `stop_after` steps; rank 0
    writes the checkpoint to `directory`."""
    group = join_group(TIMEOUT, TIMEOUT)
    try:
        steps: list[int] = []

        def on_checkpoint(checkpoint: LiveCheckpoint) -> None:
            if group.rank == 0:
                checkpoint.write(Path(directory))

        def should_stop() -> str | None:
            return "stopped" if steps and steps[-1] == stop_after else None

        result = train(
            on_cuda(resume_spec(group.world_size)),
            Callbacks(on_step=lambda m: steps.append(m.step), on_checkpoint=on_checkpoint,
                      should_stop=should_stop if group.rank == 0 else lambda: None),
            group=group,
        )  # fmt: skip
        return result.step
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("out_of_memory", [False, True])
def test_ranks_on_nccl_end_at_the_weights_of_one_gpu_training_the_whole_window(
    out_of_memory: bool,
) -> None:
    """fp64 within 1e-10 relative: sums in another order, as on the CPU. Each rank runs
    on GPU LOCAL_RANK with the NCCL backend, and every rank holds the same weights."""
    by_rank = launch(WORLD_SIZE, out_of_memory, entrypoint=train_every_case_on_cuda)
    for rank in range(WORLD_SIZE):
        placement = by_rank[rank]["placement"]
        assert placement["backend"] == "nccl", placement
        assert placement["device"] == placement["local_rank"], placement
    for case in CASES:
        reference_metrics: list[StepMetrics] = []
        window = MICRO * STEPS * WORLD_SIZE
        reference = train(
            on_cuda(spec_for(case, 1, window, 1)), Callbacks(on_step=reference_metrics.append)
        )
        first = by_rank[0][case]
        assert relative_error(first["weights"], flat_weights(reference.model)) <= FP64_TOLERANCE
        losses = torch.tensor(first["losses"], dtype=torch.float64)
        expected = torch.tensor([m.loss for m in reference_metrics], dtype=torch.float64)
        assert relative_error(losses, expected) <= FP64_TOLERANCE
        for rank in range(WORLD_SIZE):
            assert by_rank[rank][case]["parameter_devices"] == {f"cuda:{rank}"}
            assert torch.equal(by_rank[rank][case]["weights"], first["weights"])
        if out_of_memory and case == "mlp-tail":
            assert all(by_rank[rank][case]["micro"] == [1] * 6 for rank in range(WORLD_SIZE))


def test_a_run_checkpointed_on_two_gpus_resumes_on_one_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp64 within 1e-10. Rank 0's checkpoint holds the random states of both GPUs it
    saw; the resumed process sees one (CUDA_VISIBLE_DEVICES=0) and restores that one."""
    undisturbed = flat_weights(train(on_cuda(resume_spec(1))).model)
    stopped = launch(WORLD_SIZE, str(tmp_path), 4, entrypoint=train_and_stop_on_cuda)
    assert sorted(stopped.values()) == [4, 4]
    assert Checkpoint.read(tmp_path).step == 4
    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    )
    resumed = launch(1, str(tmp_path), entrypoint=resume_on_one_gpu)
    assert resumed[0][0] == 7
    assert relative_error(resumed[0][1], undisturbed) <= FP64_TOLERANCE


def resume_on_one_gpu(directory: str) -> tuple[int, torch.Tensor, int]:
    assert torch.cuda.device_count() == 1
    result = train(on_cuda(resume_spec(1)), resume=Checkpoint.read(Path(directory)))
    return result.step, flat_weights(result.model), torch.cuda.device_count()
