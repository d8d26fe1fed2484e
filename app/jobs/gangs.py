"""Gang scheduling: a job on several nodes starts only when one worker per node has a
place in its run, and all of them or none run it.

The claim is the database's, made of the lease machinery of one-node jobs:

- The **leader** is the worker that claims the job row itself (app/jobs/runs.py
  `claim_job`): the job's lease, heartbeats, progress, checkpoints, hand-back, cancel and
  the reaper's expiry work as for any job. It claims a multi-node job only when the live
  workers of its queue can hold the whole gang now (`free_nodes`: live workers with a
  free pool slot, less the open slots of other gangs; at least `min_nodes`, and the gang
  is as many nodes as fit, up to `nodes`). Otherwise it passes the job over, and the job
  waits holding nothing (`hold_gangs` writes its `warning` event once). Every worker
  ranks jobs the same way (app/jobs/scheduling.py), so two gangs do not each take half
  of the cluster.
- It then opens the gang (`open_gang`): one `job_slots` row per node, slot 0 its own
  with the rendezvous address (TRAINJOB_WORKER_ADDRESS) and a free port, slots 1..N−1
  open; and sends N−1 wake messages to its queue.
- A **follower** is a worker whose message finds an open slot of a gang of its queue
  (`claim_open_slot`, before it looks for a job to lead): a conditional UPDATE on the
  slot, read with FOR UPDATE SKIP LOCKED on PostgreSQL, so two workers never share one.
- Each slot carries the job's lease token of the run it belongs to (fencing): once the
  job's lease moves on (a hand-back, the reaper, a new claim) or the job is no longer
  live, the slot is void (`renew_slot` says so and its follower stops), and the reaper
  deletes it (`delete_void_slots`).
- **Bounded**: a gang not complete within TRAINJOB_GANG_WAIT_SECONDS is given up: the
  leader deletes its slots and hands the job back (`INCOMPLETE`: queued, the attempt not
  counted), so a partial claim never blocks anything for longer.

Leases: the leader's is the job's. A follower renews its slot's `expires_at`; a slot
expired and not released is a lost node, and the leader stops the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, insert, select, text, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.models import Job, JobSlot
from app.jobs.runs import LIVE_STATUSES, Claim, append_events, sendable

HELD_BY = "nodes"
# The class id of the gang claims' advisory locks (two-key form), apart from others'.
GANG_LOCK_CLASS = 0x676E  # "gn"
# The reason a run's hand-back gives when its gang did not form in time.
INCOMPLETE = "gang_incomplete"


@dataclass(frozen=True)
class Slot:
    """A node's place in a gang's run, as its worker holds it."""

    job_id: str
    slot: int
    lease: int
    nodes: int  # the gang's size
    address: str  # the rendezvous: slot 0's address and port
    port: int
    claim: dict[str, Any]  # the run's claim, which global rank 0 runs the job with


def _current(job_id: Any, lease: Any) -> Any:
    """The slot belongs to the job's live run: its lease is the job's (fencing)."""
    return exists(
        select(Job.id).where(Job.id == job_id, Job.lease == lease, Job.status.in_(LIVE_STATUSES))
    )


def lock_gangs(session: Session, *, devices: int) -> None:
    """Hold back the other gang claims of the queue of `devices` devices a node until this
    transaction ends, so that counting the free workers, claiming a job and opening its
    gang are one step: two workers counting at once would each see room for a gang, and
    the two gangs would each wait for the other's nodes. Take it before reading anything
    of the claim."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:lock_class, :devices)"),
            {"lock_class": GANG_LOCK_CLASS, "devices": devices},
        )
    elif dialect == "sqlite":
        # One writer at a time: take the write lock before the reads.
        connection = session.connection()
        if not getattr(connection.connection.dbapi_connection, "in_transaction", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def gangs_around(session: Session, *, devices: int) -> bool:
    """Whether a multi-node job of the queue of `devices` devices a node waits or runs:
    only then does a claim need the lock and the free workers."""
    return (
        session.scalar(
            select(Job.id)
            .where(Job.status.in_(("queued", "running")), Job.devices == devices, Job.nodes > 1)
            .limit(1)
        )
        is not None
    )


def open_gang(
    session: Session,
    *,
    claim: Claim,
    nodes: int,
    worker: str,
    address: str,
    port: int,
    claim_data: dict[str, Any],
    lease_timeout: float,
) -> None:
    """The claimed job's gang of `nodes`: slot 0 the leader's (`worker`, where the others
    meet it at `address`:`port`), the others open."""
    session.execute(delete(JobSlot).where(JobSlot.job_id == claim.job_id))
    expires = utcnow() + timedelta(seconds=lease_timeout)
    rows = [
        {
            "job_id": claim.job_id,
            "slot": slot,
            "lease": claim.lease,
            "worker": worker if slot == 0 else None,
            "expires_at": expires if slot == 0 else None,
            "address": address,
            "port": port,
            "claim": claim_data,
            "outcome": None,
            "released": False,
        }
        for slot in range(nodes)
    ]
    session.execute(insert(JobSlot), rows)


def claim_open_slot(
    session: Session, *, worker: str, devices: int, lease_timeout: float
) -> Slot | None:
    """An open slot of a live gang whose nodes run on `devices` devices each, taken for
    `worker`; None when there is none (or another worker took each one first)."""
    candidates = session.execute(
        select(JobSlot.job_id, JobSlot.slot, JobSlot.lease)
        .join(Job, Job.id == JobSlot.job_id)
        .where(
            JobSlot.worker.is_(None),
            Job.lease == JobSlot.lease,
            Job.status == "running",
            Job.devices == devices,
            # One node per worker: two pool children of one worker would share its devices.
            JobSlot.job_id.not_in(select(JobSlot.job_id).where(JobSlot.worker == worker)),
        )
        .order_by(JobSlot.job_id, JobSlot.slot)
        .limit(8)
        .with_for_update(skip_locked=True, of=JobSlot)
    ).all()
    now = utcnow()
    for candidate in candidates:
        # Conditional: on SQLite nothing is locked, and a slot may have been taken since.
        taken = session.execute(
            update(JobSlot)
            .where(
                JobSlot.job_id == candidate.job_id,
                JobSlot.slot == candidate.slot,
                JobSlot.lease == candidate.lease,
                JobSlot.worker.is_(None),
                _current(JobSlot.job_id, JobSlot.lease),
            )
            .values(worker=worker, expires_at=now + timedelta(seconds=lease_timeout))
            .returning(JobSlot.address, JobSlot.port, JobSlot.claim)
        ).first()
        if taken is None:
            continue
        nodes = session.scalar(
            select(func.count()).where(
                JobSlot.job_id == candidate.job_id, JobSlot.lease == candidate.lease
            )
        )
        return Slot(
            candidate.job_id,
            candidate.slot,
            candidate.lease,
            int(nodes or 0),
            taken.address,
            taken.port,
            dict(taken.claim),
        )
    return None


def renew_slot(session: Session, *, slot: Slot, worker: str, lease_timeout: float) -> bool:
    """Renew a follower's slot; False when it is void (the job's run is not the one it
    belongs to any more): the follower stops."""
    renewed = session.execute(
        update(JobSlot)
        .where(
            JobSlot.job_id == slot.job_id,
            JobSlot.slot == slot.slot,
            JobSlot.lease == slot.lease,
            JobSlot.worker == worker,
            _current(JobSlot.job_id, JobSlot.lease),
        )
        .values(expires_at=utcnow() + timedelta(seconds=lease_timeout))
    ).rowcount  # type: ignore[attr-defined]
    return bool(renewed)


def release_slot(
    session: Session, *, slot: Slot, worker: str, outcome: dict[str, Any] | None
) -> None:
    """The follower's launcher has exited: its worker is free, and the outcome global
    rank 0 wrote, if it ran on this node, is left for the leader to record."""
    session.execute(
        update(JobSlot)
        .where(
            JobSlot.job_id == slot.job_id,
            JobSlot.slot == slot.slot,
            JobSlot.lease == slot.lease,
            JobSlot.worker == worker,
        )
        .values(released=True, outcome=outcome)
    )


@dataclass(frozen=True)
class GangState:
    filled: int  # slots with a worker
    nodes: int
    lost: int  # followers whose slot expired without being released
    running: int  # followers not yet released
    outcome: dict[str, Any] | None  # what a follower's rank 0 wrote


def gang_state(session: Session, *, claim: Claim, now: datetime | None = None) -> GangState:
    """The leader's view of its gang."""
    now = now or utcnow()
    rows = session.execute(
        select(
            JobSlot.slot, JobSlot.worker, JobSlot.expires_at, JobSlot.released, JobSlot.outcome
        ).where(JobSlot.job_id == claim.job_id, JobSlot.lease == claim.lease)
    ).all()
    followers = [row for row in rows if row.slot > 0 and row.worker is not None]
    lost = [row for row in followers if not row.released and _before(row.expires_at, now)]
    outcomes = [row.outcome for row in followers if row.outcome is not None]
    return GangState(
        filled=sum(row.worker is not None for row in rows),
        nodes=len(rows),
        lost=len(lost),
        running=sum(not row.released for row in followers) - len(lost),
        outcome=outcomes[0] if outcomes else None,
    )


def _before(moment: datetime | None, now: datetime) -> bool:
    if moment is None:
        return False
    if moment.tzinfo is None:  # SQLite hands back naive UTC times
        moment = moment.replace(tzinfo=now.tzinfo)
    return moment < now


def close_gang(session: Session, *, job_id: str) -> None:
    """The run is over (or never started): its slots go, and their workers are free."""
    session.execute(delete(JobSlot).where(JobSlot.job_id == job_id))


def delete_void_slots(session: Session) -> int:
    """Slots of runs that are over (the job's lease moved on, or it is not live): their
    leader died or handed the job back without deleting them. Their followers stop at
    their next renewal."""
    return int(
        session.execute(delete(JobSlot).where(~_current(JobSlot.job_id, JobSlot.lease))).rowcount  # type: ignore[attr-defined]
    )


def busy_followers(session: Session, *, workers: list[str]) -> dict[str, int]:
    """How many live gangs each of `workers` follows (a pool slot each)."""
    return dict(
        session.execute(  # type: ignore[arg-type]
            select(JobSlot.worker, func.count())
            .where(
                JobSlot.worker.in_(workers),
                JobSlot.slot > 0,
                JobSlot.released.is_(False),
                _current(JobSlot.job_id, JobSlot.lease),
            )
            .group_by(JobSlot.worker)
        ).all()
    )


def open_slots(session: Session, *, devices: int) -> int:
    """Open slots of live gangs on `devices` devices a node: workers they will take."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(JobSlot)
            .join(Job, Job.id == JobSlot.job_id)
            .where(
                JobSlot.worker.is_(None),
                Job.lease == JobSlot.lease,
                Job.status == "running",
                Job.devices == devices,
            )
        )
        or 0
    )


def jobs_wait_for_nodes(session: Session, *, devices: int) -> bool:
    """Whether a job of the queue of `devices` devices a node was passed over for want of
    free nodes (its message is spent: a gang that ends wakes workers for it)."""
    waiting = select(Job.id).where(sendable(), Job.devices == devices, Job.held_by == HELD_BY)
    return session.scalar(waiting.limit(1)) is not None


def hold_gangs(session: Session, *, devices: int, free_nodes: int) -> list[str]:
    """Mark the queued jobs on `devices` devices a node that need more nodes than are free
    now, each with a `warning` event (once: a claim clears the mark)."""
    held = session.execute(
        select(Job.id, Job.min_nodes)
        .where(
            sendable(),
            Job.devices == devices,
            Job.min_nodes > free_nodes,
            Job.held_by.is_(None),
        )
        .limit(100)
    ).all()
    for job in held:
        are = "is" if free_nodes == 1 else "are"
        message = (
            f"waits: it needs {job.min_nodes} worker nodes at once and {free_nodes} {are} "
            "free now; it holds none of them while it waits"
        )
        data = {"message": message, "nodes": job.min_nodes, "free_nodes": free_nodes}
        append_events(session, job.id, [("warning", data)])
    if held:
        session.execute(
            update(Job).where(Job.id.in_([job.id for job in held])).values(held_by=HELD_BY)
        )
    return [job.id for job in held]
