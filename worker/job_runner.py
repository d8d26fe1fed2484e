"""Runs one job for the Celery task: claim, train, record the outcome.

The job a message names is a hint: the worker claims the job the database says runs next
on its queue (app/jobs/scheduling.py `claim_next`: priority with aging, fair share, age),
which may be another job of the same device count; that job's own message then wakes a
worker for the next one, so none is lost and none runs twice (the scheduling module's
docstring says why).

A job on several nodes (app/jobs/gangs.py): a message first offers its worker an open
slot of a forming gang, which it follows (`_follow`); otherwise the worker may claim a
job to lead, a multi-node one only when the gang fits the free workers, its gang opened
in the claim's transaction (`_choose`); the leader wakes the followers and runs its node
of the group (`_lead`).

Imported inside the task only, so the worker's parent process never loads torch
(and never initialises CUDA before forking its children).
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import redis
import sqlalchemy.exc
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.blobs import default_store
from app.checkpoints import service as checkpoints_service
from app.db import Database
from app.errors import NotFound
from app.files import usage as files_usage
from app.jobs import devices as jobs_devices
from app.jobs import gangs, scheduling
from app.jobs.models import Job
from app.jobs.runs import Claim, LeaseLost, finish_job, hand_back, send_jobs
from app.jobs.spec import FileDatasetSpec, JobSpec
from app.observability.logs import job_context
from app.queue import Sender
from app.settings import Settings
from worker.datafiles.fetch import RunFiles
from worker.devices import worker_devices
from worker.engine.checkpoint import Checkpoint
from worker.engine.distributed import GroupBroken, RankGroup
from worker.engine.errors import TrainingError
from worker.engine.hf import HfLimits
from worker.engine.trainer import Callbacks, StepMetrics, train
from worker.faults import fault_hooks
from worker.group import Rendezvous, run_group
from worker.lease import LeaseKeeper
from worker.live import LivePublisher
from worker.progress_writer import ProgressWriter, retry_database
from worker.tracking.job import end_tracking, start_tracking, tracked_on_step

logger = logging.getLogger(__name__)


def latest_checkpoint(database: Database, settings: Settings, job_id: str) -> Checkpoint | None:
    """The newest stored checkpoint of the job, to resume from; None for a fresh start."""
    with database.session() as session:
        try:
            stored = checkpoints_service.find_checkpoint(session, job_id=job_id)
        except NotFound:
            return None
        weights, state = (
            b"".join(
                checkpoints_service.read_part(
                    session, checkpoint=stored, part=part, checkpoint_dir=settings.checkpoint_dir
                )
            )
            for part in ("weights", "state")
        )
    return Checkpoint(step=stored.step, weights=weights, state=state, loss=stored.loss)


def run_job(job_id: str, settings: Settings, *, worker: str, enqueue: Sender) -> None:
    """For a message naming `job_id`, claim for `worker` the job to run now (`job_id` or
    a better one of its queue) and train it to an outcome; `enqueue` re-sends the job
    when it is handed back (shutdown, preemption, connection lost)."""
    database = Database(settings.effective_database_url)
    publisher = LivePublisher(settings.redis_url)
    try:
        if not _files_ready(database, publisher, job_id):
            return
        choice = _choose(database, settings, job_id, worker)
        if choice.slot is not None:
            _follow(database, settings, choice.slot, worker)
            return
        claim = choice.claim
        with database.session() as session:
            job = session.get(Job, claim.job_id) if claim else None
        if claim is None or job is None:
            logger.info(
                "message for job %s: nothing claimable (a duplicate, a cancel, a pause, "
                "jobs held by a quota, or one run elsewhere): skipped",
                job_id,
            )
            return
        if claim.job_id != job_id:
            # The hinted job's turn comes with the claimed job's own message.
            logger.info(
                "message for job %s: job %s comes first and runs instead", job_id, claim.job_id
            )
        with job_context(claim.job_id, claim.attempt):  # on every log line of the run
            logger.info(
                "job %s: attempt %d (lease %d) on %s from step %d",
                claim.job_id,
                claim.attempt,
                claim.lease,
                worker,
                claim.resumed_from_step,
            )
            publisher.status(claim.job_id, "running")
            spec = JobSpec.model_validate(job.spec)
            nodes = choice.nodes
            if nodes > 1:
                outcome = _lead(database, settings, claim, spec, choice, enqueue)
            else:
                outcome = _run(database, settings, publisher, claim, spec)
            if outcome is not None:
                _record(database, settings, publisher, claim, outcome, enqueue)
            if spec.nodes > 1 and _jobs_wait_for_nodes(database, spec.devices):
                # Its workers are free again: wake them for the jobs that waited for nodes
                # (their messages were taken by workers that passed them over).
                for _ in range(nodes):
                    enqueue(claim.job_id, spec.devices)
    finally:
        publisher.close()
        database.dispose()


@dataclass(frozen=True)
class Choice:
    """What a message gives its worker: a job to run (on a gang of `nodes`, opened with
    its rendezvous on `port`), an open slot of another's gang, or nothing."""

    claim: Claim | None = None
    nodes: int = 1
    port: int = 0
    slot: gangs.Slot | None = None


def _choose(database: Database, settings: Settings, job_id: str, worker: str) -> Choice:
    """For a message naming `job_id`: an open slot of a forming gang of its queue first;
    else the job to run now (app/jobs/scheduling.py), a multi-node one only when its gang
    fits the free workers (app/jobs/gangs.py), its gang opened in the same transaction."""
    lease_timeout = settings.lease_timeout_seconds
    with database.session() as session:
        devices = session.scalar(select(Job.devices).where(Job.id == job_id))
        free = 1
        if devices is not None and gangs.gangs_around(session, devices=devices):
            gangs.lock_gangs(session, devices=devices)
            slot = gangs.claim_open_slot(
                session, worker=worker, devices=devices, lease_timeout=lease_timeout
            )
            if slot is not None:
                session.commit()
                return Choice(slot=slot)
            free = _free_nodes(session, settings, devices)
        claim = scheduling.claim_next(
            session,
            hint=job_id,
            worker=worker,
            lease_timeout=lease_timeout,
            policy=scheduling.Policy.of(settings),
            free_nodes=free,
        )
        job = session.get(Job, claim.job_id) if claim else None
        if claim is None or job is None or job.nodes == 1:
            session.commit()
            return Choice(claim=claim)
        # As many nodes as are free, up to the spec's (never fewer than its minimum: the
        # claim passed it over then).
        nodes = min(job.nodes, max(free, job.min_nodes))
        port = _rendezvous_port() if nodes > 1 else 0
        if nodes > 1:
            gangs.open_gang(
                session,
                claim=claim,
                nodes=nodes,
                worker=worker,
                address=settings.worker_address,
                port=port,
                claim_data=asdict(claim),
                lease_timeout=lease_timeout,
            )
        session.commit()
        return Choice(claim=claim, nodes=nodes, port=port)


def _jobs_wait_for_nodes(database: Database, devices: int) -> bool:
    with database.session() as session:
        return gangs.jobs_wait_for_nodes(session, devices=devices)


def _free_nodes(session: Session, settings: Settings, devices: int) -> int:
    """How many workers of the queue could join a gang now, this one included."""
    if settings.redis_url is None:
        return 1
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return jobs_devices.free_nodes(session, client, queue=settings.queue, devices=devices)
    finally:
        client.close()


def _rendezvous_port() -> int:
    """A free port for the gang's rendezvous store (the leader's launcher listens on it
    at once; another process taking it in between fails the run, which is retried)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def _lead(
    database: Database,
    settings: Settings,
    claim: Claim,
    spec: JobSpec,
    choice: Choice,
    enqueue: Sender,
) -> Outcome | None:
    """Run the claimed job on its gang (opened by the claim): the followers woken, this
    node's launcher run, then the outcome global rank 0 wrote (here, or in a follower's
    slot)."""
    owned = worker_devices(settings.worker_devices)
    nodes, port = choice.nodes, choice.port
    for _ in range(nodes - 1):
        enqueue(claim.job_id, spec.devices)
    logger.info(
        "job %s: leads a gang of %d nodes, rendezvous at %s:%d",
        claim.job_id,
        nodes,
        settings.worker_address,
        port,
    )
    rendezvous = Rendezvous(
        nodes=nodes,
        address=settings.worker_address,
        port=port,
        run_id=f"{claim.job_id}-{claim.lease}",
        is_host=True,
        local_address=settings.worker_address,
        join_timeout_seconds=settings.gang_wait_seconds,
    )
    keeper = LeaseKeeper(
        database, claim, heartbeat_seconds=settings.heartbeat_seconds, max_runtime_seconds=None
    )
    deadline = time.monotonic() + settings.gang_wait_seconds
    formed = False

    def watch() -> str | None:
        nonlocal formed
        if keeper.lost:
            return "lease lost"
        with database.session() as session:
            state = gangs.gang_state(session, claim=claim)
        if state.lost:
            return f"{state.lost} node(s) stopped renewing their slot"
        if not formed:
            formed = state.filled == state.nodes
            if not formed and time.monotonic() > deadline:
                return f"the gang did not form in {settings.gang_wait_seconds:g} s"
            if not formed and (keeper.cancel_requested or keeper.release_requested):
                return "asked to stop before the gang formed"
        return None

    keeper.start()
    try:
        result = run_group(
            claim.job_id,
            asdict(claim),
            spec.devices,
            owned,
            rendezvous=rendezvous,
            watch=watch,
            watch_seconds=min(1.0, settings.heartbeat_seconds),
        )
        written = result.outcome
        if written is None and result.exit_code == 0:
            # Rank 0 ran on a follower's node (its node left this one in peace).
            written = _followers_outcome(database, settings, claim)
    finally:
        keeper.stop()
        with database.session() as session:
            # A group that formed and failed between two looks is a failed run, not a
            # gang that never formed.
            state = gangs.gang_state(session, claim=claim)
            formed = formed or state.filled == state.nodes
            gangs.close_gang(session, job_id=claim.job_id)
            session.commit()
    if written is None:
        if not formed:
            return Outcome("queued", hand_back=gangs.INCOMPLETE, counted=False)
        logger.warning(
            "job %s: its group ended (exit code %d) before rank 0 could say how",
            claim.job_id,
            result.exit_code,
        )
        return Outcome("queued", hand_back=RANK_FAILED)
    outcome = outcome_from_json(written)
    if outcome is not None and outcome.runtime_seconds is not None:
        outcome = replace(outcome, runtime_seconds=keeper.runtime_seconds())
    return outcome


def _followers_outcome(
    database: Database, settings: Settings, claim: Claim
) -> dict[str, Any] | None:
    """The outcome rank 0 wrote on a follower's node: there once every follower has
    released its slot (or stopped renewing it, within the lease)."""
    deadline = time.monotonic() + settings.lease_timeout_seconds + settings.heartbeat_seconds
    while True:
        with database.session() as session:
            state = gangs.gang_state(session, claim=claim)
        if state.outcome is not None or state.running == 0 or time.monotonic() > deadline:
            return state.outcome
        time.sleep(0.2)


def _follow(database: Database, settings: Settings, slot: gangs.Slot, worker: str) -> None:
    """Run this node of a gang's group, in the slot taken, until the launcher exits or
    the slot is void. A follower records nothing of the job: rank 0 does, if it lands
    here, through the outcome left in the slot for the leader."""
    with database.session() as session:
        job = session.get(Job, slot.job_id)
        assert job is not None  # the slot was taken while its job ran
    spec = JobSpec.model_validate(job.spec)
    owned = worker_devices(settings.worker_devices)
    rendezvous = Rendezvous(
        nodes=slot.nodes,
        address=slot.address,
        port=slot.port,
        run_id=f"{slot.job_id}-{slot.lease}",
        is_host=False,
        local_address=settings.worker_address,
        join_timeout_seconds=settings.gang_wait_seconds,
    )
    renewed_at = time.monotonic()

    def watch() -> str | None:
        nonlocal renewed_at
        if time.monotonic() - renewed_at < settings.heartbeat_seconds:
            return None
        with database.session() as session:
            current = gangs.renew_slot(
                session, slot=slot, worker=worker, lease_timeout=settings.lease_timeout_seconds
            )
            session.commit()
        renewed_at = time.monotonic()
        return None if current else "the job's run is over (its slot is void)"

    with job_context(slot.job_id, int(slot.claim.get("attempt", 0))):
        logger.info(
            "job %s: node %d of %d, rendezvous at %s:%d",
            slot.job_id,
            slot.slot,
            slot.nodes,
            slot.address,
            slot.port,
        )
        result = run_group(
            slot.job_id,
            slot.claim,
            spec.devices,
            owned,
            rendezvous=rendezvous,
            watch=watch,
            watch_seconds=min(1.0, settings.heartbeat_seconds),
        )
        with database.session() as session:
            gangs.release_slot(session, slot=slot, worker=worker, outcome=result.outcome)
            session.commit()
        logger.info("job %s: node %d done (exit code %d)", slot.job_id, slot.slot, result.exit_code)


def _files_ready(database: Database, publisher: LivePublisher, job_id: str) -> bool:
    """Whether the job's files (if it trains on uploaded files) are all valid. A job
    waiting for a file's validation stays queued (the claim refuses it: that validation
    sends it). One whose file turned out invalid fails `invalid_data`."""
    with database.session() as session:
        blocker = files_usage.blocking_file(session, job_id=job_id)
        if blocker is None:
            return True
        if blocker.status == "validating":
            logger.info("job %s waits for file %s to be validated", job_id, blocker.id)
            return False
        message = files_usage.invalid_file_message(blocker)
        failed = files_usage.fail_queued_jobs(session, messages={job_id: message})
        session.commit()
    if failed:
        logger.info("job %s failed: %s", job_id, message)
        error = {"type": files_usage.INVALID_DATA, "message": message}
        publisher.status(job_id, "failed", error=error)
    return False


@contextmanager
def run_files(database: Database, settings: Settings, spec: JobSpec) -> Iterator[RunFiles | None]:
    """The uploaded files of a run, fetched on first use into a directory of the run's
    own (deleted after it); None for a built-in or plugin dataset."""
    if not isinstance(spec.dataset, FileDatasetSpec):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="trainjob-run-") as directory:
        yield RunFiles(database, files_dir=settings.files_dir, directory=Path(directory))


@dataclass(frozen=True)
class Outcome:
    """How a run ended: finished (succeeded/failed/cancelled) or handed back (queued)."""

    status: str
    error: tuple[str, str] | None = None
    hand_back: str | None = None  # the reason, when the job goes back to the queue
    counted: bool = True
    runtime_seconds: float | None = None


def outcome_to_json(outcome: Outcome | None) -> dict[str, Any]:
    """What rank 0 of a group tells the pool child (worker/group.py)."""
    return {"lease_lost": True} if outcome is None else asdict(outcome)


def outcome_from_json(data: dict[str, Any]) -> Outcome | None:
    if data.get("lease_lost"):
        return None
    error = data.pop("error")
    return Outcome(**data, error=(error[0], error[1]) if error else None)


# A rank of the job's group died or lost its connection: retried like a lost worker.
RANK_FAILED = "rank_failed"


def _run(
    database: Database, settings: Settings, publisher: LivePublisher, claim: Claim, spec: JobSpec
) -> Outcome | None:
    """The claimed job trained here, or on its devices by a group of ranks."""
    if spec.devices == 1:
        return train_claimed(database, settings, publisher, claim, spec)
    owned = worker_devices(settings.worker_devices)
    if spec.devices > owned.count:  # a queue this worker should not consume
        message = f"needs {spec.devices} devices; this worker has {owned.count}"
        logger.warning("job %s: %s", claim.job_id, message)
        return Outcome("queued", hand_back="too_few_devices")
    # Heartbeats from here too: the lease must outlive the seconds the group takes to
    # start, before rank 0's own keeper beats (the two renew the same lease).
    keeper = LeaseKeeper(
        database, claim, heartbeat_seconds=settings.heartbeat_seconds, max_runtime_seconds=None
    )
    keeper.start()
    try:
        result = run_group(claim.job_id, asdict(claim), spec.devices, owned)
    finally:
        keeper.stop()
    if result.outcome is None:
        logger.warning(
            "job %s: its group ended (exit code %d) before rank 0 could say how",
            claim.job_id,
            result.exit_code,
        )
        return Outcome("queued", hand_back=RANK_FAILED)
    outcome = outcome_from_json(result.outcome)
    if outcome is not None and outcome.runtime_seconds is not None:
        # Rank 0 counts from its own start: the group's start-up is the attempt's time too.
        outcome = replace(outcome, runtime_seconds=keeper.runtime_seconds())
    return outcome


# Failures of the service around the run, not of the job: retried up to max_attempts.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
)


def train_claimed(
    database: Database,
    settings: Settings,
    publisher: LivePublisher,
    claim: Claim,
    spec: JobSpec,
    group: RankGroup | None = None,
) -> Outcome | None:
    """Train the claimed job here (on one device, or as rank 0 of its group) and say how
    it ended; None when the lease was lost to another run."""
    keeper = LeaseKeeper(
        database,
        claim,
        heartbeat_seconds=settings.heartbeat_seconds,
        max_runtime_seconds=spec.max_runtime_seconds,
    )
    writer = ProgressWriter(
        database,
        claim,
        default_store(settings.checkpoint_dir),
        publisher,
        keeper,
        flush_seconds=settings.progress_flush_seconds,
        give_up_seconds=settings.lease_timeout_seconds,
    )
    tracker = start_tracking(database, settings, claim, spec)
    on_step: Callable[[StepMetrics], None] = writer.on_step
    if tracker is not None:
        on_step = tracked_on_step(writer.on_step, writer.on_event, tracker)
    callbacks = Callbacks(
        on_start=writer.on_start,
        on_step=on_step,
        on_event=writer.on_event,
        on_checkpoint=writer.on_checkpoint,
        should_stop=writer.should_stop,
    )
    outcome = _train_to_outcome(database, settings, claim, spec, group, keeper, writer, callbacks)
    if tracker is not None:
        end_tracking(tracker, outcome.status if outcome else None, database, settings, spec, writer)
    return outcome


def _train_to_outcome(
    database: Database,
    settings: Settings,
    claim: Claim,
    spec: JobSpec,
    group: RankGroup | None,
    keeper: LeaseKeeper,
    writer: ProgressWriter,
    callbacks: Callbacks,
) -> Outcome | None:
    keeper.start()
    try:
        with run_files(database, settings, spec) as files:
            result = train(
                spec,
                callbacks,
                resume=latest_checkpoint(database, settings, claim.job_id),
                hooks=fault_hooks(settings.test_faults),
                files=files,
                hf_limits=HfLimits(settings.hf_model_dirs, settings.hf_max_parameters),
                group=group,
                deterministic=settings.deterministic,
            )
        writer.flush(required=True)
    except LeaseLost:
        logger.warning("job %s: lease lost to another run; stopping without writing", claim.job_id)
        return None
    except TrainingError as failure:
        return Outcome("failed", (failure.type, failure.message))
    except INFRASTRUCTURE_ERRORS:
        logger.exception("job %s: connection lost", claim.job_id)
        return Outcome("queued", hand_back="connection_lost")
    except GroupBroken:
        logger.exception("job %s: a rank of its group failed", claim.job_id)
        return Outcome("queued", hand_back=RANK_FAILED)
    except torch.OutOfMemoryError as failure:
        # One the engine's backoff does not cover (loading the model, a checkpoint or its
        # optimizer state onto the device): the same device would run out again.
        logger.warning("job %s: out of memory outside a training step", claim.job_id)
        # PyTorch's CUDA message is long (allocator statistics, a setting to try): its
        # first sentence says how much was asked for.
        detail = " ".join(str(failure).split())[:300]
        message = (
            "out of memory outside the training step (loading the model, a checkpoint or the "
            f"optimizer state onto the device), where a smaller micro-batch cannot help: {detail}"
        )
        return Outcome("failed", ("out_of_memory", message))
    except Exception as failure:
        logger.exception("job %s failed", claim.job_id)
        return Outcome("failed", ("internal_error", f"{type(failure).__name__}: {failure}"))
    finally:
        keeper.stop()
    runtime = keeper.runtime_seconds()
    if result.status == "completed":
        return Outcome("succeeded", runtime_seconds=runtime)
    if result.stop_reason == "shutdown":
        return Outcome("queued", hand_back="shutdown", counted=False, runtime_seconds=runtime)
    if result.stop_reason == "timeout":
        message = (
            f"ran {runtime:.0f} s, over max_runtime_seconds={spec.max_runtime_seconds}; "
            f"the checkpoint at step {result.step} is kept"
        )
        return Outcome("failed", ("timeout", message), runtime_seconds=runtime)
    return Outcome("cancelled", runtime_seconds=runtime)


def _record(
    database: Database,
    settings: Settings,
    publisher: LivePublisher,
    claim: Claim,
    outcome: Outcome,
    enqueue: Sender,
) -> None:
    def write() -> tuple[bool, str]:
        """Whether the job went back to the queue, and the status it was left in."""
        with database.session() as session:
            status = outcome.status
            if outcome.hand_back is not None:
                requeued = hand_back(
                    session,
                    claim=claim,
                    reason=outcome.hand_back,
                    counted=outcome.counted,
                    runtime_seconds=outcome.runtime_seconds,
                )
                if not requeued:  # paused (as asked) or cancelled meanwhile
                    status = (
                        session.scalar(select(Job.status).where(Job.id == claim.job_id)) or status
                    )
            else:
                finish_job(
                    session,
                    claim=claim,
                    status=outcome.status,
                    error=outcome.error,
                    runtime_seconds=outcome.runtime_seconds,
                )
                requeued = False
            session.commit()
        return requeued, status

    try:
        requeued, status = retry_database(
            write, settings.lease_timeout_seconds, f"outcome of {claim.job_id}"
        )
    except LeaseLost:
        logger.warning("job %s: lease lost before recording %s", claim.job_id, outcome.status)
        return
    except INFRASTRUCTURE_ERRORS:
        # The job stays `running` with a stale lease: the reaper re-queues it.
        logger.exception("job %s: could not record %s", claim.job_id, outcome.status)
        return
    if requeued:
        logger.info("job %s handed back (%s)", claim.job_id, outcome.hand_back)
        with database.session() as session:
            send_jobs(session, [claim.job_id], send=enqueue)
        publisher.status(claim.job_id, "queued", reason=outcome.hand_back)
    elif outcome.error is not None:  # only a failure has one
        error_type, message = outcome.error
        publisher.status(claim.job_id, "failed", error={"type": error_type, "message": message})
    else:
        publisher.status(claim.job_id, status)
