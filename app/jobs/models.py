"""Tables of the jobs domain: jobs, their append-only events, and per-step metrics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, utcnow

# SQLite autoincrements only INTEGER PRIMARY KEY; Postgres gets a 64-bit identity.
AutoIncrementId = BigInteger().with_variant(Integer, "sqlite")


class Job(Base):
    __tablename__ = "jobs"

    # "job_" + 12 hex digits of milliseconds + 12 random: ids sort by creation time,
    # so the newest-first list and its `after` cursor need only the primary key.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    # The tenant of the API key that submitted it ("default" while auth is off).
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    batch_size: Mapped[int] = mapped_column(Integer)
    micro_batch_size: Mapped[int] = mapped_column(Integer)
    accumulation_steps: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    max_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    samples_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_type: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Runs that count against max_attempts (a run handed back at shutdown does not).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set when the job's worker is shutting down: it checkpoints and hands the job back.
    release_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    # Bumped by every claim; writes of a worker carry the lease they claimed with.
    lease: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the job's message was last published; None: not (successfully) sent yet.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The spec's devices, as a column: it picks the job's training queue (app/queue.py).
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The spec's nodes: a job on several is gang-scheduled (app/jobs/gangs.py).
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The fewest it may run on (the spec's elastic.min_nodes, else nodes).
    min_nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Scheduling (app/jobs/scheduling.py): the spec's priority and preemptible, as columns
    # the claim orders and filters by.
    priority: Mapped[int] = mapped_column(Integer, default=500, server_default="500")
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    # When it last became queued (submit, hand-back, resume): its priority ages from here.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its current (or last) run claimed it: preemption spares a run younger than
    # TRAINJOB_MIN_RUN_SECONDS.
    last_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why release_requested was set: "shutdown" (its worker stops), "preempted" (a job of
    # higher priority waits) or "pause"; the hand-back reads it.
    release_reason: Mapped[str | None] = mapped_column(String(16))
    # The quota that holds this queued job back, once its `warning` event is written.
    held_by: Mapped[str | None] = mapped_column(String(32))
    # Training time of all attempts so far, for the spec's max_runtime_seconds.
    runtime_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_tenant_id", "tenant", "id"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
        # The dashboard counts the jobs finished in the last hour: a range on this.
        Index("ix_jobs_finished_at", "finished_at"),
    )


class JobAttempt(Base):
    """One run of a job on a worker; `attempt` is the lease the run claimed with."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resumed_from_step: Mapped[int] = mapped_column(Integer, default=0)
    # None while running; then succeeded, cancelled, shutdown, worker_lost, or the
    # error type of a failure (nan_loss, out_of_memory, timeout, ...).
    reason: Mapped[str | None] = mapped_column(String(32))
    # Whether the run counts against max_attempts.
    counted: Mapped[bool] = mapped_column(Boolean, default=True)
    # Seconds the job waited queued before this run claimed it (trainjob_queue_wait_seconds).
    waited_seconds: Mapped[float | None] = mapped_column(Float)

    # Fair share and the device-hours quota sum the device-seconds of runs that ended in a
    # recent window (or still run).
    __table_args__ = (Index("ix_job_attempts_ended_at", "ended_at"),)


class JobSlot(Base):
    """One node's place in the run of a multi-node job (app/jobs/gangs.py). Slot 0 is the
    leader's, the worker that claimed the job; the others are open (no worker) until a
    follower takes them. A slot belongs to the run whose lease token it carries: once
    the job's lease moves on, it is void."""

    __tablename__ = "job_slots"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The job's lease token (jobs.lease) of the run the slot belongs to: fencing.
    lease: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    # A follower renews its slot; an expired one counts as lost (its worker died).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The rendezvous (slot 0's): where every node's launcher meets the others.
    address: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    # The run's claim (lease, attempt, ...), which global rank 0 runs the job with
    # wherever it lands; and the outcome that rank wrote, when it ran on this node.
    claim: Mapped[dict[str, Any]] = mapped_column(JSON)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The follower's launcher has exited: the slot no longer holds its worker.
    released: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_job_slots_worker", "worker"),)


class JobEvent(Base):
    """Append-only; the increasing id is the cursor for listing and streaming."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(AutoIncrementId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class JobMetric(Base):
    """One row per optimizer step."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    samples_per_sec: Mapped[float] = mapped_column(Float)
    micro_batch_size: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Everything else the engine reports for the step (eval_loss, skipped, ...).
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class IdempotencyKey(Base):
    """A submit's Idempotency-Key: the same key and body again returns the same job."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the normalised spec: the same key with another body is a conflict.
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)
