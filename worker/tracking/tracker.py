"""One job's run logged to a tracking server from a thread of its own, off the loop.

The training loop only puts each step's metrics on a bounded queue (`on_step`); the
thread connects (importing MLflow there, not in the loop), opens the job's run and logs
its params, then every `flush_seconds` sends what the queue holds in batched calls, and
at the end uploads the final weights and sets the run's status.

Tracking never fails or slows the job: the first error of any kind (a server that is
down, refuses or times out, a bad experiment, a queue the server cannot keep up with)
stops tracking for this run and becomes one warning, which the job's own thread picks
up (`take_warning`) and records as a `warning` event. A resumed job continues the same
run and skips the steps the run already holds (a step re-run from a checkpoint is
bit-identical), so that each step is logged once.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from worker.engine.trainer import StepMetrics
from worker.tracking.mlflow_backend import LAST_STEP_TAG, MetricPoint, OpenedRun

logger = logging.getLogger(__name__)

# Steps waiting for the thread: at a step a millisecond, ten seconds of a server that
# answers slowly before tracking gives up rather than hold the job's memory.
QUEUE_STEPS = 10_000
# How long the end of a job waits for its last metrics, the weights' upload and the
# run's status; past it the job ends and the thread carries on alone.
END_TIMEOUT_SECONDS = 120.0
WARNING_DETAIL_CHARACTERS = 300
# StepMetrics fields that are not metrics: the step is each point's step, the time its
# timestamp.
_NOT_METRICS = frozenset({"step", "time"})


class Backend(Protocol):
    """A tracking server's runs (worker/tracking/mlflow_backend.py)."""

    def open_run(self, *, experiment: str, run_name: str, tags: dict[str, str]) -> OpenedRun: ...

    def log(
        self,
        run_id: str,
        *,
        metrics: Sequence[MetricPoint] = ...,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None: ...

    def upload(self, run_id: str, directory: Path, artifact_path: str) -> None: ...

    def set_status(self, run_id: str, status: str) -> None: ...


def metric_points(metrics: StepMetrics) -> list[MetricPoint]:
    """A step's numbers as metric points at its step (a bool as 0 or 1). Absent values
    (no evaluation this step) and non-finite ones (an fp16 overflow) are left out, as the
    job's own metrics rows store them as null."""
    timestamp_ms = int(metrics.time * 1000)
    points = []
    for key, value in metrics.to_dict().items():
        if key in _NOT_METRICS or value is None:
            continue
        number = float(value)
        if math.isfinite(number):
            points.append(MetricPoint(key, number, timestamp_ms, metrics.step))
    return points


@dataclass(eq=False, kw_only=True)
class RunTracker:
    connect: Callable[[], Backend]  # called in the thread: it may import MLflow
    experiment: str
    run_name: str
    tags: dict[str, str]
    params: dict[str, str]
    flush_seconds: float
    # Strings a warning must not show (the tracking URI may hold credentials).
    secrets: tuple[str, ...] = ()
    queue_steps: int = QUEUE_STEPS
    _steps: queue.Queue[StepMetrics] = field(init=False)
    _thread: threading.Thread | None = field(init=False, default=None)
    _ending: threading.Event = field(init=False, default_factory=threading.Event)
    _end_status: str | None = field(init=False, default=None)
    _end_weights: Path | None = field(init=False, default=None)
    _stopped: bool = field(init=False, default=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _warning: str | None = field(init=False, default=None)
    _warned: bool = field(init=False, default=False)
    run_id: str | None = field(init=False, default=None)
    last_step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._steps = queue.Queue(maxsize=self.queue_steps)

    @property
    def active(self) -> bool:
        """Whether tracking goes on (no error stopped it)."""
        return not self._stopped

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tracking", daemon=True)
        self._thread.start()

    def on_step(self, metrics: StepMetrics) -> None:
        """From the training loop: queued, never waited for."""
        if self._stopped:
            return
        try:
            self._steps.put_nowait(metrics)
        except queue.Full:
            self.stop(
                f"the tracking server fell {self.queue_steps} steps behind the job (at step "
                f"{metrics.step})"
            )

    def take_warning(self) -> str | None:
        """The one warning of this run, once (then None)."""
        with self._lock:
            warning, self._warning = self._warning, None
        return warning

    def end(
        self, status: str | None, weights: Path | None = None, timeout: float = END_TIMEOUT_SECONDS
    ) -> None:
        """Send what is queued, upload `weights` (a directory, deleted after) when the
        run FINISHED, and set the run's `status`; None (the job is another run's now):
        stop without a further call. Waits up to `timeout` seconds."""
        self._end_status, self._end_weights = status, weights
        if status is None:
            self._stopped = True
        self._ending.set()
        if self._thread is None:
            self._discard(weights)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # it deletes the weights when it is done with them
            self.stop(f"the tracking server did not take the run's end within {timeout:g} s")
        else:  # it may have stopped before they were handed over
            self._discard(weights)

    def _run(self) -> None:
        doing = "could not connect"
        try:
            backend = self.connect()
            doing = "could not open the run"
            opened = backend.open_run(
                experiment=self.experiment, run_name=self.run_name, tags=self.tags
            )
            self.run_id, self.last_step = opened.run_id, opened.last_step
            doing = "could not log the params"
            missing = {k: v for k, v in self.params.items() if k not in opened.param_keys}
            if missing:
                backend.log(opened.run_id, params=missing)
            doing = "could not log metrics"
            while True:
                ending = self._ending.wait(self.flush_seconds)
                if self._stopped:  # by the loop (a full queue) or a run lost to another
                    return
                self._send(backend, opened.run_id)
                if ending:
                    break
            status, weights = self._end_status, self._end_weights
            if status == "FINISHED" and weights is not None:
                doing = "could not upload the final weights"
                backend.upload(opened.run_id, weights, "weights")
            if status is not None:
                doing = f"could not set the run's status to {status}"
                backend.set_status(opened.run_id, status)
        except Exception as error:
            self.stop(f"{doing}: {type(error).__name__}: {error}")
        finally:
            self._discard(self._end_weights)

    def _send(self, backend: Backend, run_id: str) -> None:
        points: list[MetricPoint] = []
        last_step = self.last_step
        while True:
            try:
                metrics = self._steps.get_nowait()
            except queue.Empty:
                break
            if metrics.step <= last_step:
                continue  # logged by an earlier attempt: the same numbers
            points += metric_points(metrics)
            last_step = metrics.step
        if last_step > self.last_step:
            backend.log(run_id, metrics=points, tags={LAST_STEP_TAG: str(last_step)})
            self.last_step = last_step

    def stop(self, reason: str) -> None:
        """Stop tracking this run, with its one warning (later ones are dropped)."""
        self._stopped = True
        for secret in self.secrets:
            if secret:
                reason = reason.replace(secret, "<tracking server>")
        detail = " ".join(reason.split())[:WARNING_DETAIL_CHARACTERS]
        logger.warning("experiment tracking stopped: %s", detail)
        with self._lock:
            if self._warned:
                return
            self._warned = True
            self._warning = f"experiment tracking stopped for this run (the job goes on): {detail}"

    @staticmethod
    def _discard(weights: Path | None) -> None:
        if weights is not None:
            shutil.rmtree(weights, ignore_errors=True)
