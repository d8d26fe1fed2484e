"""Which queued job runs next: the database's order, not the broker's.

A training message wakes a worker; the job it names is only a hint. The worker claims the
best claimable job of the same device count (the same queue, app/queue.py), in this order:

1. effective priority, highest first: the spec's `priority` (0..1000) plus one point for
   every `TRAINJOB_PRIORITY_AGING_SECONDS` it has waited since it last became queued, so
   a low-priority job rises until it runs: nothing starves;
2. fair share: the tenant whose runs used the fewest device-seconds in the last
   `TRAINJOB_FAIR_SHARE_WINDOW_SECONDS`, divided by its `share` (default 1), first;
3. age: the oldest submit first (job ids sort by creation time).

A job whose tenant is at its `max_running_devices` quota is passed over (it waits, held by
the quota; `hold_blocked_jobs` writes its `warning` event once).

Why a message for job A may start job B and nothing is lost or run twice: each queue holds
one message per sendable job of its device count (the reaper re-sends what is missing,
app/jobs/reaper.py), and each message consumed claims at most one job of that count, so
after A's message starts B, B's message is still queued and will start the next best job,
A included. The claim itself is one conditional UPDATE bumping the job's lease (app/jobs/
runs.py): two workers picking the same job cannot both win, and the candidate is read with
FOR UPDATE SKIP LOCKED on PostgreSQL so they seldom try.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Float,
    Integer,
    Select,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from app.db import utcnow
from app.jobs import gangs
from app.jobs.models import Job, JobAttempt
from app.jobs.runs import LIVE_STATUSES, Claim, append_events, claim_job, sendable
from app.tenants.models import Tenant

# A bounded look at the head of a queue, for preemption.
HEAD = 50
CLAIM_TRIES = 3


class epoch_seconds(FunctionElement[float]):
    """Seconds since 1970 of a timestamp, on PostgreSQL and SQLite alike."""

    type = Float()
    inherit_cache = True


@compiles(epoch_seconds, "postgresql")
def _epoch_postgresql(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) AS FLOAT)"


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite keeps UTC times as text; julianday() reads them (day 2440587.5 is 1970-01-01).
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


class whole_part(FunctionElement[int]):
    """The integer part of a non-negative number (FLOOR; SQLite's CAST truncates)."""

    type = Integer()
    inherit_cache = True


@compiles(whole_part, "postgresql")
def _whole_postgresql(element: whole_part, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(FLOOR({compiler.process(element.clauses, **kw)}) AS INTEGER)"


@compiles(whole_part, "sqlite")
def _whole_sqlite(element: whole_part, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS INTEGER)"


@dataclass(frozen=True)
class Policy:
    """The scheduling settings (TRAINJOB_PRIORITY_AGING_SECONDS, ..._FAIR_SHARE_WINDOW_...)."""

    aging_seconds: float = 60.0
    fair_share_window_seconds: float = 3600.0

    @classmethod
    def of(cls, settings: Any) -> Policy:
        return cls(settings.priority_aging_seconds, settings.fair_share_window_seconds)


def _at(moment: datetime) -> ColumnElement[datetime]:
    return literal(moment, DateTime(timezone=True))


def effective_priority(now: datetime, policy: Policy) -> ColumnElement[int]:
    """The spec's priority plus a point per aging period waited since it was queued."""
    waited = epoch_seconds(_at(now)) - epoch_seconds(func.coalesce(Job.queued_at, Job.created_at))
    return Job.priority + whole_part(_non_negative(waited) / policy.aging_seconds)


def _non_negative(value: ColumnElement[float]) -> ColumnElement[float]:
    return case((value > 0, value), else_=0.0)


def device_seconds_by_tenant(since: datetime, now: datetime) -> Select[Any, Any]:
    """(tenant, device_seconds) of the runs between `since` and `now`: each run's devices
    (× nodes: an elastic run on fewer is counted at its spec's) × its seconds in that span,
    a run still going counted up to `now`."""
    start = case((JobAttempt.started_at > _at(since), JobAttempt.started_at), else_=_at(since))
    end = func.coalesce(JobAttempt.ended_at, _at(now))
    seconds = _non_negative(epoch_seconds(end) - epoch_seconds(start))
    return (
        select(Job.tenant, func.sum(Job.devices * Job.nodes * seconds).label("device_seconds"))
        .select_from(JobAttempt)
        .join(Job, Job.id == JobAttempt.job_id)
        .where(or_(JobAttempt.ended_at.is_(None), JobAttempt.ended_at > _at(since)))
        .group_by(Job.tenant)
    )


def running_devices_by_tenant() -> Select[Any, Any]:
    """(tenant, devices) of its live runs: what its max_running_devices quota counts."""
    return (
        select(Job.tenant, func.sum(Job.devices * Job.nodes).label("devices"))
        .where(Job.status.in_(LIVE_STATUSES))
        .group_by(Job.tenant)
    )


@dataclass(frozen=True)
class Ranking:
    """The sendable jobs of a device count, joined with what orders them."""

    query: Select[Any]
    order: tuple[ColumnElement[Any], ...]
    within_quota: ColumnElement[bool]


def ranking(now: datetime, policy: Policy, *, devices: int | None) -> Ranking:
    since = now - timedelta(seconds=policy.fair_share_window_seconds)
    usage = device_seconds_by_tenant(since, now).subquery("usage")
    running = running_devices_by_tenant().subquery("running")
    fair_share = func.coalesce(usage.c.device_seconds, 0.0) / func.coalesce(Tenant.share, 1.0)
    cap = Tenant.max_running_devices
    wanted = Job.devices * Job.nodes
    within_quota = or_(cap.is_(None), func.coalesce(running.c.devices, 0) + wanted <= cap)
    query = (
        select(Job.id)
        .outerjoin(Tenant, Tenant.name == Job.tenant)
        .outerjoin(usage, usage.c.tenant == Job.tenant)
        .outerjoin(running, running.c.tenant == Job.tenant)
        .where(sendable(), Job.attempts < Job.max_attempts)
    )
    if devices is not None:
        query = query.where(Job.devices == devices)
    order = (effective_priority(now, policy).desc(), fair_share.asc(), Job.id.asc())
    return Ranking(query, order, within_quota)


def next_job(
    session: Session, *, devices: int, now: datetime, policy: Policy, free_nodes: int = 1
) -> str | None:
    """The id of the job of `devices` devices to run next, locked (PostgreSQL) until the
    transaction ends; None when every one waits (or none is queued). A job on several
    nodes is passed over unless `free_nodes` workers can hold its gang now (app/jobs/
    gangs.py)."""
    rank = ranking(now, policy, devices=devices)
    fits = Job.min_nodes <= free_nodes
    query = rank.query.where(rank.within_quota, fits).order_by(*rank.order).limit(1)
    return session.scalar(query.with_for_update(skip_locked=True, of=Job))


def queue_position(
    session: Session, *, job_id: str, devices: int, now: datetime, policy: Policy
) -> int | None:
    """How many queued jobs of the same device count would run before this one now (quotas
    aside); None when it is not queued to run."""
    rank = ranking(now, policy, devices=devices)
    numbered = rank.query.add_columns(
        func.row_number().over(order_by=rank.order).label("position")
    ).subquery()
    position = session.scalar(select(numbered.c.position).where(numbered.c.id == job_id))
    return None if position is None else int(position) - 1


@dataclass(frozen=True)
class Holds:
    held: list[str]  # newly held back by a quota (each given its warning event)
    released: list[str]  # held until now, free to run: the caller sends them again


def hold_blocked_jobs(session: Session, *, now: datetime) -> Holds:
    """Mark the queued jobs that a running-devices quota holds back, each with a `warning`
    event naming the quota (once: until the quota lets it go, when the mark is cleared).
    A held job's message was likely taken by a worker that passed it over, so one let go
    is to be sent again at once rather than when the reaper finds its message lost."""
    running = running_devices_by_tenant().subquery("running")
    in_use = func.coalesce(running.c.devices, 0)
    blocked = and_(
        Tenant.max_running_devices.is_not(None),
        in_use + Job.devices * Job.nodes > Tenant.max_running_devices,
    )
    base = (
        select(
            Job.id,
            Job.tenant,
            (Job.devices * Job.nodes).label("devices"),
            Tenant.max_running_devices,
            in_use.label("in_use"),
        )
        .join(Tenant, Tenant.name == Job.tenant)
        .outerjoin(running, running.c.tenant == Job.tenant)
        .where(sendable())
    )
    held = session.execute(base.where(blocked, Job.held_by.is_(None)).limit(HEAD * 20)).all()
    for job in held:
        message = (
            f"waits: tenant {job.tenant!r} runs jobs on {job.in_use} of its "
            f"max_running_devices={job.max_running_devices} devices, and this job needs "
            f"{job.devices} more"
        )
        data = {
            "message": message,
            "quota": "max_running_devices",
            "limit": job.max_running_devices,
            "in_use": int(job.in_use),
        }
        append_events(session, job.id, [("warning", data)])
    if held:
        session.execute(
            update(Job)
            .where(Job.id.in_([job.id for job in held]))
            .values(held_by="max_running_devices")
        )
    # Let go of those the quota no longer holds (a later hold warns again).
    free = (
        select(Job.id)
        .where(Job.held_by == "max_running_devices", Job.status == "queued")
        .except_(base.with_only_columns(Job.id).where(blocked))
    )
    released = list(session.scalars(free))
    if released:
        session.execute(update(Job).where(Job.id.in_(released)).values(held_by=None))
    return Holds([job.id for job in held], released)


@dataclass(frozen=True)
class Capacity:
    """What the live workers can take now: for a device count, the workers that run jobs
    of that many devices, and how many of them have a free slot."""

    workers: Callable[[int], set[str]]
    free_slots: Callable[[int], int]


def preempt_for_waiting(
    session: Session,
    *,
    now: datetime,
    policy: Policy,
    capacity: Capacity,
    gap: int,
    min_run_seconds: float,
) -> list[tuple[str, str]]:
    """Ask running jobs to hand their device back to waiting ones of much higher priority.

    For each device count with queued jobs: the head of its queue (within quotas) beyond
    what the free slots and the preemptions already under way will take, each in turn,
    takes the running job of the lowest priority on a worker that can run it, that is
    preemptible, ran at least `min_run_seconds` since its last start, and whose priority
    is `gap` or more below the waiting job's (the spec's priorities, not aged ones). The
    victim checkpoints at its next optimizer step and goes back to the queue (app/jobs/
    runs.py hand_back). Returns (victim, waiting job) pairs.
    """
    preempted: list[tuple[str, str]] = []
    queued_counts = session.execute(
        select(Job.devices).where(sendable()).group_by(Job.devices)
    ).scalars()
    for devices in list(queued_counts):
        workers = capacity.workers(devices)
        if not workers:
            continue
        rank = ranking(now, policy, devices=devices)
        head = session.execute(
            rank.query.add_columns(Job.priority)
            .where(rank.within_quota)
            .order_by(*rank.order)
            .limit(HEAD)
        ).all()
        under_way = (
            session.scalar(
                select(func.count()).where(
                    Job.status == "running",
                    Job.release_requested.is_(True),
                    Job.release_reason == "preempted",
                    Job.worker.in_(workers),
                )
            )
            or 0
        )
        for waiting in head[capacity.free_slots(devices) + under_way :]:
            victim = session.execute(
                select(Job.id)
                .where(
                    Job.status == "running",
                    Job.worker.in_(workers),
                    Job.preemptible.is_(True),
                    Job.release_requested.is_(False),
                    Job.priority + gap <= waiting.priority,
                    or_(
                        Job.last_started_at.is_(None),
                        Job.last_started_at <= now - timedelta(seconds=min_run_seconds),
                    ),
                )
                .order_by(Job.priority.asc(), Job.last_started_at.desc(), Job.id.desc())
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar()
            if victim is None:
                break  # the next waiting job has no higher priority: none frees one
            session.execute(
                update(Job)
                .where(Job.id == victim, Job.status == "running", Job.release_requested.is_(False))
                .values(release_requested=True, release_reason="preempted")
            )
            data = {
                "message": f"preempted by {waiting.id} (priority {waiting.priority})",
                "by": waiting.id,
            }
            append_events(session, victim, [("preempting", data)])
            preempted.append((victim, waiting.id))
    return preempted


def claim_next(
    session: Session,
    *,
    hint: str,
    worker: str,
    lease_timeout: float,
    policy: Policy,
    free_nodes: int = 1,
) -> Claim | None:
    """Claim, for a message naming job `hint`, the job to run now: `hint` itself when its
    run's worker died (a redelivered message resumes that run here), else the best job of
    its device count (`next_job`), whichever message that job's own was. None when
    nothing may run now (the caller writes nothing). `free_nodes`: how many workers of
    the queue (this one included) can join a gang now; a multi-node job that needs more
    waits, holding nothing, with a `warning` event."""
    hinted = session.execute(
        select(Job.status, Job.devices, Job.min_nodes).where(Job.id == hint)
    ).first()
    if hinted is None:
        return None
    if hinted.status == "running" and hinted.min_nodes <= free_nodes:
        stale = claim_job(session, job_id=hint, worker=worker, lease_timeout=lease_timeout)
        if stale is not None:
            return stale
    # Otherwise the message only woke this worker (`hint` may run elsewhere already).
    # SQLite has no row locks: a claim that another worker's beat is lost; try the next.
    gangs.hold_gangs(session, devices=hinted.devices, free_nodes=free_nodes)
    for _ in range(CLAIM_TRIES):
        chosen = next_job(
            session, devices=hinted.devices, now=utcnow(), policy=policy, free_nodes=free_nodes
        )
        if chosen is None:
            return None
        claim = claim_job(session, job_id=chosen, worker=worker, lease_timeout=lease_timeout)
        if claim is not None:
            return claim
    return None
