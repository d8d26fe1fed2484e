"""The dispatcher: sends the outbox's deliveries, retries the failed ones, gives up after
a day.

It runs in every API process (started by the lifespan, app/main.py), side by side: a
delivery is claimed for a short lease (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite has
one writer, and the claim's UPDATE re-checks), sent with no transaction open, and its
outcome written under the claim's token. A process that dies mid-send leaves a claim
that expires: another sends the delivery again, under the same webhook-id (at least
once). Deliveries of one job to one endpoint go out in order: none is sent while an
earlier one is still pending.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, exists, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.db import Database, utcnow
from app.webhooks import ssrf
from app.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.webhooks.sender import Message, Outcome, send

logger = logging.getLogger(__name__)

# Seconds before each retry (Standard Webhooks' and Svix's schedule): 8 attempts over
# about a day and a half, then the delivery is `failed`.
RETRY_SCHEDULE = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
BATCH = 8  # deliveries claimed, and sent in parallel, per pass


def retry_delay(attempts_made: int, *, scale: float = 1.0) -> float | None:
    """Seconds until the next attempt after `attempts_made` failed ones; None: give up."""
    if attempts_made > len(RETRY_SCHEDULE):
        return None
    return RETRY_SCHEDULE[attempts_made - 1] * scale


def claimable(now: datetime) -> ColumnElement[bool]:
    """Due, not claimed by a live dispatcher, and no earlier delivery of its job to its
    endpoint still pending."""
    earlier = aliased(WebhookDelivery)
    earlier_pending = exists(
        select(earlier.id).where(
            earlier.endpoint_id == WebhookDelivery.endpoint_id,
            earlier.job_id == WebhookDelivery.job_id,
            earlier.id < WebhookDelivery.id,
            earlier.status == "pending",
        )
    )
    return and_(
        WebhookDelivery.status == "pending",
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
        ~earlier_pending,
    )


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    token: str
    attempt: int  # the number of the attempt about to be made
    message: Message


def claim_due(
    session: Session, *, now: datetime, lease_seconds: float, limit: int
) -> list[Claimed]:
    """Claim up to `limit` due deliveries for `lease_seconds`."""
    due = (
        select(WebhookDelivery.id)
        .where(claimable(now))
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True, of=WebhookDelivery)
    ids = list(session.scalars(due))
    if not ids:
        return []
    token = secrets.token_hex(16)
    claimed = list(
        session.scalars(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids), claimable(now))
            .values(claimed_until=now + timedelta(seconds=lease_seconds), claim_token=token)
            .returning(WebhookDelivery.id)
        )
    )
    if not claimed:
        return []
    rows = session.execute(
        select(WebhookDelivery, WebhookEndpoint.url, WebhookEndpoint.secret)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id.in_(claimed))
        .order_by(WebhookDelivery.id)
    )
    return [
        Claimed(
            delivery.id,
            token,
            delivery.attempts + 1,
            Message(
                webhook_id=delivery.webhook_id,
                url=url,
                secret=secret,
                type=delivery.type,
                job_id=delivery.job_id,
                job_status=delivery.job_status,
                data=delivery.data,
                created_at=delivery.created_at,
            ),
        )
        for delivery, url, secret in rows
    ]


def record_outcome(
    session: Session, *, claimed: Claimed, outcome: Outcome, now: datetime, retry_scale: float
) -> bool:
    """Write the attempt and the delivery's next state, if the claim is still ours (an
    expired one another dispatcher took, or a deleted endpoint, writes nothing)."""
    values: dict[str, object] = {"attempts": claimed.attempt, "claimed_until": None}
    values["claim_token"] = None
    delay = None if outcome.succeeded else retry_delay(claimed.attempt, scale=retry_scale)
    if outcome.succeeded or delay is None:
        values |= {"status": "succeeded" if outcome.succeeded else "failed", "finished_at": now}
    else:
        values["next_attempt_at"] = now + timedelta(seconds=delay)
    changed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.delivery_id,
            WebhookDelivery.claim_token == claimed.token,
            WebhookDelivery.status == "pending",
        )
        .values(**values)
    ).rowcount  # type: ignore[attr-defined]
    if changed:
        session.execute(
            insert(WebhookAttempt).values(
                delivery_id=claimed.delivery_id,
                attempt=claimed.attempt,
                started_at=outcome.started_at,
                duration_ms=outcome.duration_ms,
                status_code=outcome.status_code,
                response_excerpt=outcome.response_excerpt,
                error=outcome.error,
            )
        )
    return bool(changed)


@dataclass
class Dispatcher:
    """One pass: `run_once`; as a daemon thread: `start` / `stop`."""

    database: Database
    timeout: float
    retry_scale: float = 1.0
    interval: float = 1.0
    allowed_networks: Sequence[ssrf.IPNetwork] = ()
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    @property
    def lease_seconds(self) -> float:
        # Longer than any attempt of a batch (sent in parallel) could take.
        return 2 * self.timeout + 30

    def run_once(self) -> int:
        """Send what is due; how many deliveries were attempted."""
        with self.database.sessions.begin() as session:
            batch = claim_due(session, now=utcnow(), lease_seconds=self.lease_seconds, limit=BATCH)
        if not batch:
            return 0
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            outcomes = list(pool.map(self._send, batch))
        with self.database.sessions.begin() as session:
            for claimed, outcome in zip(batch, outcomes, strict=True):
                record_outcome(
                    session,
                    claimed=claimed,
                    outcome=outcome,
                    now=utcnow(),
                    retry_scale=self.retry_scale,
                )
        return len(batch)

    def _send(self, claimed: Claimed) -> Outcome:
        outcome = send(
            claimed.message, timeout=self.timeout, allowed_networks=self.allowed_networks
        )
        # Never the URL (its path or query may hold a token) nor anything of the secret.
        if not outcome.succeeded:
            logger.info(
                "webhook %s attempt %d failed: %s",
                claimed.message.webhook_id,
                claimed.attempt,
                outcome.error,
            )
        return outcome

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                busy = self.run_once() == BATCH
            except Exception:  # a database blip: the next pass tries again
                logger.exception("webhook dispatcher pass failed")
                busy = False
            if not busy:  # a full batch: more may be due, go on at once
                self._stopped.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="trainjob-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
