"""Keeps a claimed job's lease alive from a thread, and tells the loop when to stop.

The training loop may spend longer than a lease in one window (a big model, a slow
checkpoint); a thread renews the lease every `heartbeat_seconds` regardless, and the
loop reads the flags the renewals bring back (cancel, release) at each window edge.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from dataclasses import KW_ONLY, dataclass, field

from app.db import Database
from app.jobs.runs import Claim, Heartbeat, LeaseLost, renew_lease

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class LeaseKeeper:
    database: Database
    claim: Claim
    _: KW_ONLY
    heartbeat_seconds: float
    max_runtime_seconds: int | None
    started: float = field(init=False, default_factory=time.monotonic)
    cancel_requested: bool = field(init=False, default=False)
    release_requested: bool = field(init=False, default=False)
    lost: bool = field(init=False, default=False)
    _stopped: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        # A thread starts with an empty context: run the loop in a copy of the creator's,
        # so that its log lines carry the job's id and attempt (app/observability/logs.py).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._loop,),
            name="trainjob-lease",
            daemon=True,
        )

    def runtime_seconds(self) -> float:
        """Training time of this job over all its attempts."""
        return self.claim.runtime_seconds + (time.monotonic() - self.started)

    def observe(self, heartbeat: Heartbeat) -> None:
        self.cancel_requested = self.cancel_requested or heartbeat.cancel_requested
        self.release_requested = self.release_requested or heartbeat.release_requested

    def stop_reason(self) -> str | None:
        """Asked at each window edge: why the run should stop now, if it should."""
        if self.lost:
            raise LeaseLost(self.claim.job_id)
        if self.cancel_requested:
            return "cancelled"
        if self.release_requested:
            return "shutdown"
        limit = self.max_runtime_seconds
        if limit is not None and self.runtime_seconds() >= limit:
            return "timeout"
        return None

    def _loop(self) -> None:
        while not self._stopped.wait(self.heartbeat_seconds):
            try:
                with self.database.session() as session:
                    heartbeat = renew_lease(
                        session, claim=self.claim, runtime_seconds=self.runtime_seconds()
                    )
                    session.commit()
                self.observe(heartbeat)
            except LeaseLost:
                logger.warning("job %s: lease lost; the run stops", self.claim.job_id)
                self.lost = True
                return
            except Exception:  # a database blip: the writes are fenced, keep trying
                logger.warning("job %s: heartbeat failed", self.claim.job_id, exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.heartbeat_seconds + 10)
