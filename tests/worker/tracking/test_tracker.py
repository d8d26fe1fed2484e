"""The tracking thread against a fake server: batched logging off the loop, one warning
however often the server fails, and a resumed run that logs each step once."""

from __future__ import annotations

import ast
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import wait_for
from tests.test_imports import module_names
from worker.engine.trainer import StepMetrics
from worker.tracking.mlflow_backend import LAST_STEP_TAG, MetricPoint, OpenedRun
from worker.tracking.tracker import RunTracker, metric_points


def step(number: int, **values: float | None) -> StepMetrics:
    fields: dict = {  # type: ignore[type-arg]
        "step": number,
        "epoch": 0,
        "loss": 1.0 / number,
        "lr": 0.1,
        "grad_norm": 2.0,
        "samples_seen": 8 * number,
        "tokens_seen": 0,
        "samples_per_sec": 100.0,
        "step_seconds": 0.01,
        "micro_batch_size": 4,
        "accumulation_steps": 2,
        "window_samples": 8,
        "skipped": False,
        "time": 1_700_000_000.0 + number,
    }
    return StepMetrics(**(fields | values))


@dataclass
class FakeServer:
    """Records what a run would hold; `fail` makes every call of those names raise."""

    last_step: int = 0
    param_keys: frozenset[str] = frozenset()
    fail: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    points: list[MetricPoint] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)
    status: str | None = None
    run_name: str | None = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise ConnectionError(f"{name}: http://user:pw@tracking.internal:5000 refused")

    def open_run(self, *, experiment: str, run_name: str, tags: dict[str, str]) -> OpenedRun:
        self._call("open_run")
        self.tags |= tags
        self.run_name = run_name
        return OpenedRun("run-1", self.last_step, self.param_keys)

    def log(
        self,
        run_id: str,
        *,
        metrics: Sequence[MetricPoint] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self._call("log")
        self.points += metrics
        self.params |= params or {}
        self.tags |= tags or {}

    def upload(self, run_id: str, directory: Path, artifact_path: str) -> None:
        self._call("upload")
        self.uploaded = sorted(path.name for path in directory.iterdir())

    def set_status(self, run_id: str, status: str) -> None:
        self._call("set_status")
        self.status = status


def tracker(server: FakeServer, **options: object) -> RunTracker:
    defaults: dict = {  # type: ignore[type-arg]
        "connect": lambda: server,
        "experiment": "e",
        "run_name": "r",
        "tags": {"trainjob.job_id": "job_1"},
        "params": {"model.type": "mlp", "seed": "0"},
        "flush_seconds": 0.01,
        "secrets": ("http://user:pw@tracking.internal:5000",),
    }
    started = RunTracker(**(defaults | options))
    started.start()
    return started


def loss_steps(server: FakeServer) -> list[int]:
    return [point.step for point in server.points if point.key == "loss"]


def test_steps_are_logged_in_batches_then_the_weights_and_the_status(tmp_path: Path) -> None:
    server = FakeServer()
    run = tracker(server)
    for number in range(1, 201):
        run.on_step(step(number))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"w")
    run.end("FINISHED", weights)
    assert loss_steps(server) == list(range(1, 201))
    assert server.calls.count("log") < 200 / 2  # batched: far fewer calls than steps
    assert server.params == {"model.type": "mlp", "seed": "0"}
    assert server.tags[LAST_STEP_TAG] == "200"
    assert server.uploaded == ["model.safetensors"]
    assert server.status == "FINISHED"
    assert not weights.exists()  # the tracker deletes what it uploaded
    assert run.take_warning() is None


def test_a_failing_server_gives_one_warning_and_tracking_stops() -> None:
    server = FakeServer(fail={"log"})
    run = tracker(server)
    for number in range(1, 101):
        run.on_step(step(number))
    run.end("FINISHED")
    warnings = [run.take_warning(), run.take_warning()]
    assert warnings[1] is None
    assert warnings[0] is not None and "could not log the params" in warnings[0]
    assert server.calls == ["open_run", "log"]  # nothing after the first failure
    assert not run.active


def test_a_server_that_is_down_gives_one_warning_without_the_uri() -> None:
    def refuse() -> FakeServer:
        raise ConnectionError("Max retries exceeded: http://user:pw@tracking.internal:5000")

    run = tracker(FakeServer(), connect=refuse)
    for number in range(1, 11):
        run.on_step(step(number))
    run.end("FINISHED")
    warning = run.take_warning()
    assert warning is not None
    assert "could not connect: ConnectionError" in warning
    assert "pw@" not in warning and "<tracking server>" in warning
    assert run.take_warning() is None


def test_a_resumed_run_skips_the_steps_it_holds_and_its_params() -> None:
    # An earlier attempt logged steps 1-5 and the params; the checkpoint was at step 3.
    server = FakeServer(last_step=5, param_keys=frozenset({"model.type", "seed"}))
    run = tracker(server)
    for number in range(4, 11):
        run.on_step(step(number))
    run.end("FINISHED")
    assert loss_steps(server) == [6, 7, 8, 9, 10]
    assert server.params == {}  # MLflow params cannot be logged twice with new values
    assert server.tags[LAST_STEP_TAG] == "10"


def test_a_server_too_slow_for_the_loop_stops_tracking_without_blocking_it() -> None:
    release = threading.Event()
    server = FakeServer()
    slow_open = server.open_run

    def open_run(**arguments: object) -> OpenedRun:
        release.wait(10)
        return slow_open(**arguments)  # type: ignore[arg-type]

    server.open_run = open_run  # type: ignore[method-assign]
    run = tracker(server, queue_steps=5)
    started = time.perf_counter()
    for number in range(1, 101):
        run.on_step(step(number))
    assert time.perf_counter() - started < 0.5
    release.set()
    run.end("FINISHED")
    warning = run.take_warning()
    assert warning is not None and "fell 5 steps behind" in warning
    assert server.status is None and loss_steps(server) == []


def test_absent_and_non_finite_values_are_not_metrics() -> None:
    points = metric_points(step(3, loss=float("inf"), eval_loss=None, eval_accuracy=0.5))
    keys = {point.key for point in points}
    assert "loss" not in keys and "eval_loss" not in keys
    assert {"eval_accuracy", "lr", "grad_norm", "skipped", "tokens_seen"} <= keys
    assert "step" not in keys and "time" not in keys
    assert {point.step for point in points} == {3}
    assert {point.timestamp_ms for point in points} == {1_700_000_003_000}


@pytest.mark.parametrize("status", ["SCHEDULED", "KILLED", "FAILED"])
def test_a_run_that_did_not_succeed_gets_its_status_and_no_upload(status: str) -> None:
    server = FakeServer()
    run = tracker(server)
    run.on_step(step(1))
    run.end(status)
    assert server.status == status and server.uploaded == []
    assert loss_steps(server) == [1]


def test_a_run_lost_to_another_stops_without_a_further_call() -> None:
    server = FakeServer()
    run = tracker(server)
    wait_for(lambda: server.calls == ["open_run", "log"], 10, "the run opened, its params logged")
    calls = len(server.calls)
    run.on_step(step(1))
    run.end(None)
    assert len(server.calls) <= calls + 1  # at most the flush already under way
    assert server.status is None


def imported_modules(nodes: list[ast.stmt] | list[ast.AST]) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_mlflow_is_imported_inside_functions_of_workers_only() -> None:
    """Its import takes seconds: only a tracked job's thread pays it, and the API never."""
    for name, path in module_names().items():
        tree = ast.parse(path.read_text())
        assert "mlflow" not in imported_modules(tree.body), name
        if name.split(".")[0] == "app":
            assert "mlflow" not in imported_modules(list(ast.walk(tree))), name
