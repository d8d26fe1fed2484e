"""Data parallelism is exact: a window of m·k·N samples trained by N gloo processes, each
accumulating k micro-batches of m, ends at the weights and logged losses of one process
training batches of m·k·N, in fp64 to 1e-10, through tail windows shorter than the group
and an out-of-memory error on one rank.

The ranks are real processes started by PyTorch's own launcher (elastic_launch), one
launch per group size running every case, so that the cost of starting processes is
paid once per size.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from app.jobs.spec import JobSpec
from worker.engine.checkpoint import Checkpoint, LiveCheckpoint
from worker.engine.data_types import Batch
from worker.engine.distributed import RankGroup
from worker.engine.hooks import Hooks
from worker.engine.trainer import Callbacks, StepMetrics, train

from .conftest import assert_close_relative, flat_parameters, make_spec

MICRO, STEPS = 2, 2  # m and k of every rank
CASES: dict[str, dict[str, Any]] = {
    # 16 samples, 2 held out: 14 to train. Windows of 4, 8, 12 for N = 1, 2, 3 leave
    # tails of 2, 6 and 2 samples: with N = 3 the last rank gets none.
    "mlp-tail": {
        "model": {"type": "mlp", "hidden_sizes": [16]},
        "dataset": {"type": "synthetic-classification", "n_samples": 16, "n_features": 6},
        "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
        "lr_schedule": {"type": "cosine", "warmup_steps": 2},
        "grad_clip_norm": 0.5,
    },
    # Variable-length sequences: ranks hold different numbers of loss tokens.
    "gpt-tokens": {
        "model": {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
        "dataset": {"type": "tiny-text", "min_length": 2, "max_length": 33},
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    },
}


def resume_spec(devices: int) -> JobSpec:
    """A batch of 12 on 1, 2 or 3 devices: micro-batches of 2, k = 6, 3 or 2."""
    return make_spec(
        **CASES["mlp-tail"],
        precision="fp64",
        micro_batch_size=2,
        accumulation_steps=None,
        batch_size=12,
        devices=devices,
        max_steps=7,
    )


OUT_OF_MEMORY_RANK = 1  # with N >= 2, this rank's first forward of 2 samples fails


def spec_for(case: str, devices: int, micro: int, steps: int) -> JobSpec:
    return make_spec(
        **CASES[case],
        precision="fp64",
        micro_batch_size=micro,
        accumulation_steps=steps,
        devices=devices,
        max_steps=6,
    )


def out_of_memory_once() -> Hooks:
    fired: list[bool] = []

    def before_forward(size: int, _batch: Batch) -> None:
        if size > 1 and not fired:
            fired.append(True)
            raise torch.OutOfMemoryError("injected")

    return Hooks(before_forward=before_forward)


def train_every_case(out_of_memory: bool) -> dict[str, Any]:
    """One rank's run of every case: its final weights, its losses and its splits."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        group = RankGroup.current()
        assert group is not None
        results = {}
        for case in CASES:
            metrics: list[StepMetrics] = []
            injected = out_of_memory and group.rank == OUT_OF_MEMORY_RANK
            result = train(
                spec_for(case, group.world_size, MICRO, STEPS),
                Callbacks(on_step=metrics.append),
                hooks=out_of_memory_once() if injected else Hooks(),
                group=group,
            )
            results[case] = {
                "weights": flat_parameters(result.model),
                "losses": [m.loss for m in metrics],
                "samples": [m.window_samples for m in metrics],
                "micro": [m.micro_batch_size for m in metrics],
                "steps": [m.accumulation_steps for m in metrics],
            }
        return results
    finally:
        dist.destroy_process_group()


def train_and_stop(spec: JobSpec, directory: str, stop_after: int, resume: bool) -> Any:
    """One rank of a run of the resume spec: from the checkpoint in `directory` if
    `resume`, stopped (and checkpointed by rank 0 into `directory`) after `stop_after`
    steps if given; its final weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        group = RankGroup.current()
        assert group is not None
        steps: list[int] = []

        def on_checkpoint(checkpoint: LiveCheckpoint) -> None:
            if group.rank == 0 and not resume:  # the resumed runs leave it as it is
                checkpoint.write(Path(directory))

        def should_stop() -> str | None:
            # Asked on rank 0 only (the decision is rank 0's): the others answer None.
            return "stopped" if steps and steps[-1] == stop_after else None

        result = train(
            spec,
            Callbacks(
                on_step=lambda m: steps.append(m.step),
                on_checkpoint=on_checkpoint,
                should_stop=should_stop if group.rank == 0 else lambda: None,
            ),
            resume=Checkpoint.read(Path(directory)) if resume else None,
            group=group,
        )
        return result.step, flat_parameters(result.model)
    finally:
        dist.destroy_process_group()


def random_state_at_first_forward(spec: JobSpec) -> torch.Tensor:
    """One rank's torch random state as its first micro-batch's forward begins."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        states: list[torch.Tensor] = []
        hooks = Hooks(before_forward=lambda *_: states.append(torch.get_rng_state()))
        train(spec.model_copy(update={"max_steps": 1}), hooks=hooks, group=RankGroup.current())
        return states[0]
    finally:
        dist.destroy_process_group()


def launch(world_size: int, *args: Any, entrypoint: Any = train_every_case) -> dict[int, Any]:
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return elastic_launch(config, entrypoint)(*args)


@pytest.fixture(scope="module")
def single_batch() -> dict[str, dict[str, Any]]:
    """Every case as one process trains it: each window one micro-batch (m·k·N, 1, 1)."""
    torch.set_num_threads(1)
    references: dict[str, dict[str, Any]] = {}
    for case in CASES:
        for world_size in (1, 2, 3):
            metrics: list[StepMetrics] = []
            window = MICRO * STEPS * world_size
            result = train(spec_for(case, 1, window, 1), Callbacks(on_step=metrics.append))
            references[f"{case}/{world_size}"] = {
                "weights": flat_parameters(result.model),
                "losses": torch.tensor([m.loss for m in metrics], dtype=torch.float64),
                "samples": [m.window_samples for m in metrics],
            }
    return references


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world_size", "out_of_memory"), [(1, False), (2, True), (3, False), (3, True)]
)
def test_n_ranks_end_at_the_weights_of_one_batch_of_the_whole_window(
    world_size: int, out_of_memory: bool, single_batch: dict[str, dict[str, Any]]
) -> None:
    by_rank = launch(world_size, out_of_memory)
    assert sorted(by_rank) == list(range(world_size))
    for case in CASES:
        reference = single_batch[f"{case}/{world_size}"]
        first = by_rank[0][case]
        assert first["samples"] == reference["samples"]
        if case == "mlp-tail":
            assert min(first["samples"]) < MICRO * STEPS * world_size, "no tail window"
        assert_close_relative(first["weights"], reference["weights"], 1e-10)
        losses = torch.tensor(first["losses"], dtype=torch.float64)
        assert_close_relative(losses, reference["losses"], 1e-10)
        for rank in range(1, world_size):  # every rank holds the same model
            assert torch.equal(by_rank[rank][case]["weights"], first["weights"])
        if out_of_memory and case == "mlp-tail":
            # Every rank adopted the smaller micro-batch together, k grew to keep the window.
            for rank in range(world_size):
                assert by_rank[rank][case]["micro"] == [1] * 6
                assert by_rank[rank][case]["steps"] == [STEPS * 2] * 6
        elif not out_of_memory:
            assert first["micro"] == [MICRO] * 6 and first["steps"] == [STEPS] * 6


def test_a_window_is_split_in_order_and_every_sample_goes_to_one_rank() -> None:
    window = list(range(10, 20))
    shares = [RankGroup(rank, 3).share(window) for rank in range(3)]
    assert shares == [[10, 11, 12, 13], [14, 15, 16], [17, 18, 19]]
    assert [RankGroup(rank, 3).share([7, 8]) for rank in range(3)] == [[7], [8], []]


@pytest.mark.slow
def test_a_run_checkpointed_on_two_ranks_resumes_on_three_or_one_to_the_same_weights(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    undisturbed = flat_parameters(train(resume_spec(1)).model)
    stopped = launch(2, resume_spec(2), str(tmp_path), 4, False, entrypoint=train_and_stop)
    assert [step for step, _ in stopped.values()] == [4, 4]
    assert Checkpoint.read(tmp_path).step == 4
    for world_size in (3, 1):
        resumed = launch(
            world_size, resume_spec(world_size), str(tmp_path), 0, True, entrypoint=train_and_stop
        )
        for step, weights in resumed.values():
            assert step == 7
            assert_close_relative(weights, undisturbed, 1e-10)


@pytest.mark.slow
def test_fp32_with_dropout_resumes_on_the_same_ranks_bit_identically(tmp_path: Path) -> None:
    # Dropout draws on every rank: each rank's stream must come back after a resume.
    spec = make_spec(
        model={"type": "mlp", "hidden_sizes": [16, 16], "dropout": 0.3},
        dataset=CASES["mlp-tail"]["dataset"],
        optimizer={"type": "adamw", "lr": 0.01},
        micro_batch_size=2,
        accumulation_steps=3,
        devices=2,
        max_steps=7,
    )
    first_forward = launch(2, spec, entrypoint=random_state_at_first_forward)
    assert not torch.equal(first_forward[0], first_forward[1]), "ranks drop the same units"
    undisturbed = launch(
        2, spec, str(tmp_path / "undisturbed"), 0, False, entrypoint=train_and_stop
    )
    launch(2, spec, str(tmp_path / "stopped"), 4, False, entrypoint=train_and_stop)
    resumed = launch(2, spec, str(tmp_path / "stopped"), 0, True, entrypoint=train_and_stop)
    for rank in (0, 1):
        assert resumed[rank][0] == 7
        assert torch.equal(resumed[rank][1], undisturbed[rank][1])
