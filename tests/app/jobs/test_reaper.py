"""The reaper: lost runs go back to the queue (or fail), and queued jobs get their message.

The broker is a fake that records what the reaper asks of it; the real Redis scan has its
own tests in tests/app/test_queue.py. Every test gets a database of its own, because the
reaper looks at every job in it.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import event, select, text, update

from app.db import Database, upgrade, utcnow
from app.files.models import DataFile
from app.jobs import reaper as reaper_module
from app.jobs import runs
from app.jobs import service as jobs_service
from app.jobs.models import Job
from app.jobs.reaper import Reaper, ReapReport
from app.main import create_app
from app.queue import enqueue_training
from app.settings import Settings
from tests.app.files.stored_files import add_file, create_job, text_job_spec
from tests.app.jobs.helpers import (
    LEASE,
    age_heartbeat,
    attempt_rows,
    claim,
    create,
    enqueued_at,
    last_event,
    load,
    set_enqueued_at,
    try_claim,
)
from tests.conftest import wait_for
from worker.celery_app import make_celery

REQUEUE_AFTER = 300.0


@pytest.fixture(scope="module")
def reaper_postgres_url(make_postgres_database: Callable[[], str]) -> str:
    url = make_postgres_database()
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def migrated_sqlite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reaper") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty migrated database of each kind, seen by no other test."""
    if request.param == "postgres":
        db = Database(request.getfixturevalue("reaper_postgres_url"))
        with db.engine.begin() as connection:
            connection.execute(text("TRUNCATE jobs, files CASCADE"))
    else:
        path = tmp_path / "reaper.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_file"), path)
        db = Database(f"sqlite:///{path}")
    yield db
    db.dispose()


@dataclass
class FakeBroker:
    """Which jobs have a message in the broker, and what the reaper did with it."""

    holds: set[str] = field(default_factory=set)
    reachable: bool = True
    scans: int = 0
    sent: list[str] = field(default_factory=list)

    def in_broker(self) -> set[str]:
        self.scans += 1
        return set(self.holds)

    def send(self, job_id: str) -> bool:
        if not self.reachable:
            return False
        self.sent.append(job_id)
        self.holds.add(job_id)
        return True


def make_reaper(database: Database, broker: FakeBroker) -> Reaper:
    return Reaper(
        database,
        lease_timeout=LEASE,
        requeue_after=REQUEUE_AFTER,
        interval=1.0,  # run_once only
        in_broker=broker.in_broker,
        send=broker.send,
    )


def started(database: Database, broker: FakeBroker) -> Reaper:
    """A reaper past its first pass (the one that checks every queued job)."""
    reaper = make_reaper(database, broker)
    assert reaper.run_once() == ReapReport()  # the database is empty
    return reaper


def lost_run(database: Database, **changes: Any) -> tuple[str, runs.Claim]:
    """A job whose worker stopped renewing its lease."""
    job_id = create(database, **changes)
    taken = claim(database, job_id, "lost-worker")
    age_heartbeat(database, job_id, LEASE * 2)
    return job_id, taken


def test_a_lost_run_is_requeued_and_sent_in_the_same_pass(database: Database) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    lost, _ = lost_run(database)
    live = create(database)
    claim(database, live, "live-worker")
    age_heartbeat(database, live, LEASE / 2)  # late, but within the lease

    report = reaper.run_once()

    assert report == ReapReport(requeued=[lost], sent=[lost])
    assert broker.sent == [lost]
    job = load(database, lost)
    assert (job.status, job.worker, job.attempts) == ("queued", None, 1)
    assert enqueued_at(database, lost) is not None  # sent: the next pass leaves it alone
    assert last_event(database, lost) == ("status", {"status": "queued", "reason": "worker_lost"})
    [row] = attempt_rows(database, lost)
    assert row.reason == "worker_lost" and row.ended_at is not None
    untouched = load(database, live)
    assert (untouched.status, untouched.worker, untouched.lease) == ("running", "live-worker", 1)
    assert attempt_rows(database, live)[0].ended_at is None

    assert claim(database, lost, "next-worker").attempt == 2
    assert reaper.run_once() == ReapReport() and broker.sent == [lost]


def test_a_lost_run_on_its_last_attempt_fails_worker_lost(database: Database) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    job_id, _ = lost_run(database, max_attempts=1)

    assert reaper.run_once() == ReapReport(failed=[job_id])

    job = load(database, job_id)
    assert (job.status, job.error_type) == ("failed", "worker_lost")
    assert job.error_message and job.finished_at is not None
    kind, data = last_event(database, job_id)
    assert (kind, data["status"], data["error"]["type"]) == ("status", "failed", "worker_lost")
    [row] = attempt_rows(database, job_id)
    assert row.reason == "worker_lost" and row.ended_at is not None
    assert broker.sent == [] and try_claim(database, job_id, "another") is None


def test_a_lost_run_that_was_being_cancelled_is_cancelled(database: Database) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    job_id, _ = lost_run(database)
    with database.session() as session:
        jobs_service.request_cancel(session, job_id=job_id)
        session.commit()

    assert reaper.run_once() == ReapReport(cancelled=[job_id])

    job = load(database, job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.error_type is None
    assert last_event(database, job_id) == ("status", {"status": "cancelled"})
    assert attempt_rows(database, job_id)[0].ended_at is not None
    assert broker.sent == []


def test_a_worker_that_comes_back_after_the_reaper_has_lost_its_job(database: Database) -> None:
    reaper = started(database, FakeBroker())
    job_id, taken = lost_run(database)
    assert reaper.run_once().requeued == [job_id]
    with database.session() as session, pytest.raises(runs.LeaseLost):
        runs.renew_lease(session, claim=taken, runtime_seconds=1.0)
    assert load(database, job_id).status == "queued"  # its late heartbeat revived nothing


def test_an_unsent_job_is_sent_and_a_failed_send_is_retried(database: Database) -> None:
    broker = FakeBroker(reachable=False)
    reaper = started(database, broker)
    job_id = create(database)
    with database.session() as session:
        jobs_service.mark_unsent(session, job_id=job_id)  # the API could not publish
        session.commit()

    assert reaper.run_once() == ReapReport()
    assert enqueued_at(database, job_id) is None  # still owed a message

    broker.reachable = True
    assert reaper.run_once() == ReapReport(sent=[job_id])
    assert broker.sent == [job_id] and enqueued_at(database, job_id) is not None
    assert broker.scans == 0  # a job never sent needs no look at the broker

    assert reaper.run_once() == ReapReport() and broker.sent == [job_id]


def test_an_overdue_job_is_sent_again_only_when_the_broker_lost_its_message(
    database: Database,
) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    held, lost_message, fresh = create(database), create(database), create(database)
    long_ago = set_enqueued_at(database, held, REQUEUE_AFTER * 2)
    set_enqueued_at(database, lost_message, REQUEUE_AFTER * 2)
    fresh_at = enqueued_at(database, fresh)
    broker.holds = {held}  # `fresh` may still be on its way: not looked for

    report = reaper.run_once()

    assert report == ReapReport(sent=[lost_message]) and broker.sent == [lost_message]
    assert broker.scans == 1
    checked_at = enqueued_at(database, held)
    assert long_ago is not None and checked_at is not None
    assert checked_at > utcnow() - timedelta(seconds=REQUEUE_AFTER)  # not overdue any more
    assert enqueued_at(database, fresh) == fresh_at

    assert reaper.run_once() == ReapReport()
    assert broker.scans == 1  # nothing overdue: the broker is not read


def test_the_first_pass_checks_every_queued_job(database: Database) -> None:
    held, lost_message, unsent, running = (create(database) for _ in range(4))
    set_enqueued_at(database, unsent, None)
    claim(database, running, "worker")
    broker = FakeBroker(holds={held})
    reaper = make_reaper(database, broker)

    report = reaper.run_once()

    assert sorted(report.sent) == sorted([lost_message, unsent])
    assert sorted(broker.sent) == sorted([lost_message, unsent]) and broker.scans == 1

    after_start = create(database)  # recent and not in the broker: left alone from now on
    assert reaper.run_once() == ReapReport() and after_start not in broker.sent


def test_the_first_pass_goes_through_more_queued_jobs_than_one_batch(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper_module, "BATCH", 2)
    jobs = [create(database) for _ in range(5)]  # recently sent, but Redis lost them all
    broker = FakeBroker()
    reaper = make_reaper(database, broker)

    sent = [job for _ in range(3) for job in reaper.run_once().sent]

    assert sorted(sent) == sorted(jobs)  # a batch per pass, each job once
    assert reaper.run_once() == ReapReport()  # the startup check is over


def test_a_failed_send_ends_the_pass_and_the_next_goes_on(database: Database) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    first, second = create(database), create(database)
    for job_id in (first, second):
        set_enqueued_at(database, job_id, None)
    attempts: list[str] = []

    def send_once_down(job_id: str) -> bool:
        attempts.append(job_id)
        return False

    reaper.send = send_once_down
    assert reaper.run_once().sent == [] and attempts == [first]  # not one try per job
    reaper.send = broker.send
    assert sorted(reaper.run_once().sent) == sorted([first, second])


def test_a_hand_back_is_sent_again_only_when_its_worker_could_not_send_it(
    database: Database,
) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    published, unpublished = create(database), create(database)
    for job_id in (published, unpublished):
        taken = claim(database, job_id, "stopping-worker")
        with database.session() as session:
            assert runs.hand_back(session, claim=taken, reason="shutdown", counted=False)
            session.commit()
    broker.holds.add(published)  # the worker's send worked
    with database.session() as session:
        jobs_service.mark_unsent(session, job_id=unpublished)  # this one's did not
        session.commit()

    assert reaper.run_once() == ReapReport(sent=[unpublished])


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_rows_another_transaction_holds_are_skipped_not_waited_for(database: Database) -> None:
    broker = FakeBroker()
    reaper = started(database, broker)
    lost, _ = lost_run(database)
    unsent = create(database)
    set_enqueued_at(database, unsent, None)

    locker = database.sessions()
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        locker.execute(select(Job.id).where(Job.id.in_([lost, unsent])).with_for_update()).all()
        report = pool.submit(reaper.run_once).result(timeout=10)  # another API process
        assert report == ReapReport() and broker.sent == []
        assert load(database, lost).status == "running"
    finally:
        locker.rollback()
        locker.close()
        pool.shutdown()

    report = reaper.run_once()
    assert report.requeued == [lost] and sorted(report.sent) == sorted([lost, unsent])


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_heartbeat_that_lands_while_the_reaper_looks_keeps_the_job(database: Database) -> None:
    reaper = started(database, FakeBroker())
    job_id, taken = lost_run(database)
    renewed: list[bool] = []

    def renew_before_the_reaper_writes(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE jobs") and not renewed:
            renewed.append(True)  # first, so that the renewal's own UPDATE passes through
            with database.session() as session:
                runs.renew_lease(session, claim=taken, runtime_seconds=1.0)
                session.commit()

    event.listen(database.engine, "before_cursor_execute", renew_before_the_reaper_writes)
    try:
        report = reaper.run_once()
    finally:
        event.remove(database.engine, "before_cursor_execute", renew_before_the_reaper_writes)

    assert renewed, "the reaper wrote nothing: the race was not set up"
    assert report == ReapReport()
    assert load(database, job_id).status == "running"


def test_the_background_reaper_outlives_a_failing_pass(database: Database) -> None:
    broker = FakeBroker()
    scans: list[str] = []

    def broker_away_at_first() -> set[str]:
        scans.append("scan")
        if len(scans) == 1:
            raise ConnectionError("broker still starting")
        return broker.in_broker()

    held, orphan = create(database), create(database)  # sent recently; one message was lost
    broker.holds.add(held)
    lost, _ = lost_run(database)
    reaper = Reaper(
        database,
        lease_timeout=LEASE,
        requeue_after=REQUEUE_AFTER,
        interval=0.01,
        in_broker=broker_away_at_first,
        send=broker.send,
    )
    reaper.start()
    try:
        wait_for(lambda: len(broker.sent) >= 2, timeout=5, what="the reaper's second pass")
    finally:
        reaper.stop()
    # The check of every queued job that a start owes is made once the broker answers.
    assert sorted(broker.sent) == sorted([lost, orphan]) and len(scans) >= 2
    assert load(database, lost).status == "queued"


def test_the_api_runs_the_reaper_against_the_real_broker(
    database: Database, settings: Settings, redis_client: redis.Redis
) -> None:
    queue = f"{settings.queue}-api-reaper-{secrets.token_hex(4)}"
    fast = settings.model_copy(update={"queue": queue, "reaper_interval_seconds": 0.05})
    held = create(database)
    celery = make_celery(fast)
    assert enqueue_training(celery, job_id=held, queue=queue)
    celery.close()
    lost, _ = lost_run(database)

    def messages_for(job_id: str) -> int:
        raws = redis_client.lrange(queue, 0, -1)
        return sum(json.loads(raw)["headers"]["id"].startswith(job_id) for raw in raws)

    try:
        with TestClient(create_app(fast)):
            wait_for(lambda: messages_for(lost), timeout=5, what="the lost run's message")
        assert load(database, lost).status == "queued"
        assert messages_for(held) == 1  # found in Redis by the start's check: not sent again
    finally:
        redis_client.delete(queue)


# ---------------------------------------------------------------- jobs on uploaded files


def make_file_reaper(database: Database, broker: FakeBroker) -> Reaper:
    """A reaper that also sends validations again (to the same fake broker)."""
    reaper = make_reaper(database, broker)
    reaper.send_validation = broker.send
    return reaper


def set_uploaded_at(database: Database, file_id: str, seconds_ago: float) -> None:
    with database.session() as session:
        session.execute(
            update(DataFile)
            .where(DataFile.id == file_id)
            .values(created_at=utcnow() - timedelta(seconds=seconds_ago))
        )
        session.commit()


def set_file_status(database: Database, file_id: str, status: str) -> None:
    with database.session() as session:
        session.execute(update(DataFile).where(DataFile.id == file_id).values(status=status))
        session.commit()


def test_a_job_waiting_for_a_validating_file_is_never_sent(database: Database) -> None:
    train = add_file(database)
    waiting = create_job(database, text_job_spec(train))
    unsent = create(database)
    set_enqueued_at(database, unsent, None)
    broker = FakeBroker()
    reaper = make_reaper(database, broker)

    assert reaper.run_once().sent == [unsent]  # the first pass, which checks every queued job
    assert reaper.run_once() == ReapReport()
    assert enqueued_at(database, waiting) is None

    # Valid now, but its validation could not send the job: the reaper does.
    set_file_status(database, train, "valid")
    assert reaper.run_once().sent == [waiting] and broker.sent == [unsent, waiting]


def test_a_validation_whose_message_was_lost_is_sent_again(database: Database) -> None:
    lost, queued, recent, valid = (add_file(database) for _ in range(4))
    for file_id in (lost, queued, valid):
        set_uploaded_at(database, file_id, REQUEUE_AFTER * 2)
    set_file_status(database, valid, "valid")
    broker = FakeBroker(holds={queued})  # behind a long job in the queue, still there
    reaper = started(database, broker)
    reaper.send_validation = broker.send

    assert reaper.run_once() == ReapReport(validations=[lost])
    assert broker.sent == [lost] and broker.scans == 1
    assert reaper.run_once() == ReapReport()  # its message is in the broker now
    assert recent not in broker.sent


def test_validations_are_checked_a_batch_per_pass_and_resume_after_a_failed_send(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper_module, "BATCH", 2)
    stuck = [add_file(database) for _ in range(5)]
    for file_id in stuck:
        set_uploaded_at(database, file_id, REQUEUE_AFTER * 2)
    broker = FakeBroker(reachable=False)
    reaper = make_file_reaper(database, broker)

    assert reaper.run_once().validations == []  # the broker is away: nothing skipped
    broker.reachable = True
    sent = [file_id for _ in range(3) for file_id in reaper.run_once().validations]

    assert sent == sorted(stuck)  # in id order, a batch per pass, each file once
    assert reaper.run_once() == ReapReport()  # from the start again: all in the broker


def test_the_api_sends_a_lost_validation_to_the_real_broker(
    database: Database, settings: Settings, redis_client: redis.Redis
) -> None:
    queue = f"{settings.queue}-api-reaper-{secrets.token_hex(4)}"  # the files queue
    fast = settings.model_copy(update={"files_queue": queue, "reaper_interval_seconds": 0.05})
    lost = add_file(database)
    set_uploaded_at(database, lost, fast.requeue_after_seconds * 2)

    def validation_messages() -> list[dict[str, Any]]:
        messages = [json.loads(raw)["headers"] for raw in redis_client.lrange(queue, 0, -1)]
        return [m for m in messages if m["id"].startswith(lost)]

    try:
        with TestClient(create_app(fast)):
            wait_for(validation_messages, timeout=5, what="the lost validation's message")
        [message] = validation_messages()
        assert message["task"] == "trainjob.validate_file"
        assert message["argsrepr"] == repr([lost])
    finally:
        redis_client.delete(queue)
