"""The reaper: lost runs go back to the queue (or fail), and queued jobs get their message.

The broker is a fake that records what the reaper sends. Every test gets a database of its
own, because the reaper looks at every job in it.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
from app.jobs.reaper import Preemption, Reaper, ReapReport
from app.jobs.scheduling import Capacity, Policy
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
    """What the reaper sent, what waits in the queue, and whether the broker takes messages."""

    reachable: bool = True
    sent: list[str] = field(default_factory=list)
    queue: list[str] = field(default_factory=list)  # of every number of devices
    devices: dict[str, int] = field(default_factory=dict)  # each job's, as sent

    def send(self, job_id: str, devices: int = 1) -> bool:
        if not self.reachable:
            return False
        self.sent.append(job_id)
        self.queue.append(job_id)
        self.devices[job_id] = devices
        return True

    def waiting(self, devices: int = 1) -> int:
        """Messages in the queue of jobs on `devices` devices."""
        return sum(self.devices.get(job_id, 1) == devices for job_id in self.queue)


def make_reaper(database: Database, broker: FakeBroker) -> Reaper:
    return Reaper(
        database,
        lease_timeout=LEASE,
        requeue_after=REQUEUE_AFTER,
        interval=1.0,  # run_once only
        send=broker.send,
        waiting=broker.waiting,
    )


def lost_run(database: Database, **changes: Any) -> tuple[str, runs.Claim]:
    """A job whose worker stopped renewing its lease."""
    job_id = create(database, **changes)
    taken = claim(database, job_id, "lost-worker")
    age_heartbeat(database, job_id, LEASE * 2)
    return job_id, taken


def test_a_lost_run_is_requeued_and_sent_in_the_same_pass(database: Database) -> None:
    broker = FakeBroker()
    reaper = make_reaper(database, broker)
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
    reaper = make_reaper(database, broker)
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
    reaper = make_reaper(database, broker)
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
    reaper = make_reaper(database, FakeBroker())
    job_id, taken = lost_run(database)
    assert reaper.run_once().requeued == [job_id]
    with database.session() as session, pytest.raises(runs.LeaseLost):
        runs.renew_lease(session, claim=taken, runtime_seconds=1.0)
    assert load(database, job_id).status == "queued"  # its late heartbeat revived nothing


def test_an_unsent_job_is_sent_and_a_failed_send_is_retried(database: Database) -> None:
    broker = FakeBroker(reachable=False)
    reaper = make_reaper(database, broker)
    job_id = create(database)
    with database.session() as session:
        runs.mark_unsent(session, job_id=job_id)  # the API could not publish
        session.commit()

    assert reaper.run_once() == ReapReport()
    assert enqueued_at(database, job_id) is None  # still owed a message

    broker.reachable = True
    assert reaper.run_once() == ReapReport(sent=[job_id])
    assert broker.sent == [job_id] and enqueued_at(database, job_id) is not None

    assert reaper.run_once() == ReapReport() and broker.sent == [job_id]


def test_of_overdue_jobs_those_the_queue_lacks_are_sent_again_oldest_first_once(
    database: Database,
) -> None:
    broker = FakeBroker()
    reaper = make_reaper(database, broker)
    oldest, older, waiting_its_turn, fresh, running = (create(database) for _ in range(5))
    set_enqueued_at(database, oldest, REQUEUE_AFTER * 3)
    set_enqueued_at(database, older, REQUEUE_AFTER * 2.5)
    set_enqueued_at(database, waiting_its_turn, REQUEUE_AFTER * 2)
    set_enqueued_at(database, running, REQUEUE_AFTER * 4)
    claim(database, running, "worker")
    fresh_at = enqueued_at(database, fresh)
    # Four jobs sent, two messages in the queue: the two sent longest ago were taken by
    # a worker that died, or Redis lost them.
    broker.queue = [waiting_its_turn, fresh]

    assert reaper.run_once() == ReapReport(sent=[oldest, older])
    for job_id in (oldest, older):
        sent_at = enqueued_at(database, job_id)
        assert sent_at is not None and sent_at > utcnow() - timedelta(seconds=REQUEUE_AFTER)
    assert enqueued_at(database, fresh) == fresh_at

    # Not again at every pass: the queue holds a message for each queued job now.
    assert reaper.run_once() == ReapReport()
    broker.queue.clear()  # a Redis restart
    assert reaper.run_once() == ReapReport(sent=[waiting_its_turn])  # only the overdue one
    assert broker.sent == [oldest, older, waiting_its_turn]


def test_each_training_queue_is_counted_on_its_own(database: Database) -> None:
    # A job on two devices waits in its own queue (no worker that big is up); a message of
    # the one-device queue is lost. Counted together, the queues would hold as many
    # messages as jobs sent, and the lost one would never be sent again.
    broker = FakeBroker()
    reaper = make_reaper(database, broker)
    lost = create(database)
    big = create(database, micro_batch_size=4, accumulation_steps=1, devices=2)
    set_enqueued_at(database, lost, REQUEUE_AFTER * 3)
    set_enqueued_at(database, big, REQUEUE_AFTER * 4)  # sent longest ago, still waiting
    broker.queue, broker.devices = [big], {big: 2}

    assert reaper.run_once() == ReapReport(sent=[lost])
    assert broker.devices[lost] == 1  # to its own queue
    assert reaper.run_once() == ReapReport()
    broker.queue.remove(big)  # now it is the 2-device queue's message that is gone
    assert reaper.run_once() == ReapReport(sent=[big]) and broker.devices[big] == 2


def test_due_jobs_are_sent_a_batch_per_pass(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper_module, "BATCH", 2)
    jobs = [create(database) for _ in range(5)]
    for job_id in jobs:
        set_enqueued_at(database, job_id, REQUEUE_AFTER * 2)  # Redis lost them all
    broker = FakeBroker()
    reaper = make_reaper(database, broker)

    sent = [job for _ in range(3) for job in reaper.run_once().sent]

    assert sent == sorted(jobs)  # oldest first, a batch per pass, each job once
    assert reaper.run_once() == ReapReport()


def test_a_failed_send_ends_the_pass_and_the_next_goes_on(database: Database) -> None:
    broker = FakeBroker()
    reaper = make_reaper(database, broker)
    first, second = create(database), create(database)
    for job_id in (first, second):
        set_enqueued_at(database, job_id, None)
    attempts: list[str] = []

    def send_once_down(job_id: str, devices: int) -> bool:
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
    reaper = make_reaper(database, broker)
    published, unpublished = create(database), create(database)
    for job_id in (published, unpublished):
        taken = claim(database, job_id, "stopping-worker")
        with database.session() as session:
            assert runs.hand_back(session, claim=taken, reason="shutdown", counted=False)
            session.commit()
    with database.session() as session:
        runs.mark_unsent(session, job_id=unpublished)  # this one's did not
        session.commit()

    assert reaper.run_once() == ReapReport(sent=[unpublished])


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_rows_another_transaction_holds_are_skipped_not_waited_for(database: Database) -> None:
    broker = FakeBroker()
    reaper = make_reaper(database, broker)
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
    reaper = make_reaper(database, FakeBroker())
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
    sends: list[str] = []

    def broker_away_at_first(job_id: str, devices: int) -> bool:
        sends.append(job_id)
        if len(sends) == 1:
            raise ConnectionError("broker still starting")
        return broker.send(job_id)

    orphan = create(database)
    set_enqueued_at(database, orphan, None)  # never sent
    lost, _ = lost_run(database)
    reaper = Reaper(
        database,
        lease_timeout=LEASE,
        requeue_after=REQUEUE_AFTER,
        interval=0.01,
        send=broker_away_at_first,
        waiting=broker.waiting,
    )
    reaper.start()
    try:
        wait_for(lambda: len(broker.sent) >= 2, timeout=5, what="the reaper's second pass")
    finally:
        reaper.stop()
    assert sorted(broker.sent) == sorted([lost, orphan]) and len(sends) >= 3
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
        assert messages_for(held) == 1  # sent recently: not sent again
    finally:
        redis_client.delete(queue)


# ---------------------------------------------------------------- jobs on uploaded files


def make_file_reaper(database: Database, broker: FakeBroker) -> Reaper:
    """A reaper that also sends validations again (to the same fake broker)."""
    reaper = make_reaper(database, broker)
    reaper.send_validation = broker.send
    reaper.validations_waiting = broker.waiting
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

    assert reaper.run_once().sent == [unsent]
    assert reaper.run_once() == ReapReport()
    assert enqueued_at(database, waiting) is None

    # Valid now, but its validation could not send the job: the reaper does.
    set_file_status(database, train, "valid")
    assert reaper.run_once().sent == [waiting] and broker.sent == [unsent, waiting]


def test_a_validation_whose_message_was_lost_is_sent_again_once_per_delay(
    database: Database,
) -> None:
    lost, waiting_its_turn, recent, valid = (add_file(database) for _ in range(4))
    for file_id in (lost, waiting_its_turn, valid):
        set_uploaded_at(database, file_id, REQUEUE_AFTER * 2)
    set_file_status(database, valid, "valid")
    broker = FakeBroker(queue=[waiting_its_turn, recent])  # behind a long validation
    sent_at: dict[str, datetime] = {}

    def send_due(seconds_later: float) -> list[str]:
        now = utcnow() + timedelta(seconds=seconds_later)
        with database.session() as session:
            sent = reaper_module.send_due_validations(
                session,
                now=now,
                resend_after=REQUEUE_AFTER,
                waiting=broker.waiting(),
                sent_at=sent_at,
                send=broker.send,
            )
            session.commit()
        return sent

    assert send_due(0) == [lost] and broker.sent == [lost]
    broker.queue.clear()  # a Redis restart, or workers that took them and died
    assert send_due(REQUEUE_AFTER / 2) == [waiting_its_turn]  # `lost` was sent just now
    assert send_due(REQUEUE_AFTER / 2) == []  # `recent`: its message is owed to the queue
    broker.queue.clear()
    assert send_due(REQUEUE_AFTER * 1.6) == sorted([lost, waiting_its_turn, recent])


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

    assert sent == sorted(stuck)  # oldest first, a batch per pass, each file once
    assert reaper.run_once() == ReapReport()  # each has its message in the queue now


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


def preempting_reaper(
    database: Database, capacity: Callable[[Any], Capacity | None], rang: list[str]
) -> Reaper:
    return Reaper(
        database,
        lease_timeout=LEASE,
        requeue_after=REQUEUE_AFTER,
        interval=60.0,
        send=FakeBroker().send,
        waiting=FakeBroker().waiting,
        ring=rang.extend,
        preemption=Preemption(capacity=capacity, gap=100, min_run_seconds=0, policy=Policy()),
    )


def test_a_pass_asks_the_lowest_running_job_to_make_way_and_rings_its_stream(
    database: Database,
) -> None:
    low, mid = create(database, priority=100), create(database, priority=300)
    claim(database, low, "w0")
    claim(database, mid, "w1")
    urgent = create(database, priority=900)
    rang: list[str] = []
    unknown = preempting_reaper(database, lambda session: None, rang)  # Redis away
    assert unknown.run_once().preempted == [] and rang == []
    full = Capacity(workers=lambda devices: {"w0", "w1"}, free_slots=lambda devices: 0)
    reaper = preempting_reaper(database, lambda session: full, rang)
    assert reaper.run_once().preempted == [low]
    assert rang == [low]
    kind, data = last_event(database, low)
    assert (kind, data["by"]) == ("preempting", urgent)
    assert load(database, low).release_requested and not load(database, mid).release_requested
    assert reaper.run_once().preempted == []  # its hand-back is under way


def test_wake_runs_a_pass_without_waiting_for_the_interval(database: Database) -> None:
    passes: list[datetime] = []

    def counted(session: Any) -> None:
        passes.append(utcnow())

    reaper = preempting_reaper(database, counted, [])  # interval 60 s
    reaper.start()
    try:
        wait_for(lambda: len(passes) == 1, timeout=10, what="the first pass")
        reaper.wake()
        wait_for(lambda: len(passes) == 2, timeout=5, what="a pass on wake")
    finally:
        reaper.stop()
