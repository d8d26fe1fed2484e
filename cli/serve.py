"""`trainjob serve` and `trainjob worker`: the service's processes.

`serve` with nothing configured is the embedded default: a SQLite file and a private
Redis under TRAINJOB_HOME, the API, and one worker process. With TRAINJOB_DATABASE_URL
and TRAINJOB_REDIS_URL set it uses those; `--no-worker` runs the API alone. It refuses a
non-loopback address while authentication is off (cli/exposure.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys

from app.db import Database, DatabaseNotMigrated, require_migrated, upgrade
from app.observability.logs import configure_logging, send_celery_logs_to_root
from app.queue import training_queue
from app.settings import Settings, get_settings
from cli import exposure
from cli.embedded_redis import EmbeddedRedis
from worker.parent_death import dies_with

logger = logging.getLogger("trainjob.serve")

# Requests in flight get this long to finish on Ctrl-C/SIGTERM; the whole service then
# stops within about 10 s unless a running job is handing itself back (worker/shutdown.py).
API_SHUTDOWN_SECONDS = 3


def _cannot_start(settings: Settings, *, needs_redis: bool = True) -> str | None:
    """Why a command that needs the database (and Redis) cannot start, if it cannot."""
    if needs_redis and settings.redis_url is None:
        return "TRAINJOB_REDIS_URL is not set"
    database = Database(settings.effective_database_url)
    try:
        require_migrated(database)
    except DatabaseNotMigrated as error:
        return str(error)
    finally:
        database.dispose()
    return None


def serve_command(host: str | None, port: int | None, with_worker: bool) -> int:
    settings = get_settings()
    configure_logging(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.uses_embedded_database:
        # The embedded SQLite file belongs to this command: keep it at the code's schema.
        upgrade(settings.effective_database_url)
    host = host or settings.host
    # Whether authentication is on is read from the database: only once it is migrated.
    problem = _cannot_start(settings, needs_redis=False) or exposure.refusal(
        host, auth=settings.auth, auth_on=exposure.authentication_is_on(settings)
    )
    if problem:
        print(f"trainjob serve: {problem}", file=sys.stderr)
        return 2

    embedded_redis: EmbeddedRedis | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if settings.redis_url is None:
            embedded_redis = EmbeddedRedis(settings.home)
            embedded_redis.start()
            settings = settings.model_copy(update={"redis_url": embedded_redis.url})
        if with_worker:
            worker = _start_worker(settings)
        return _run_api(settings, host, port if port is not None else settings.port)
    finally:
        if worker is not None:
            _stop(worker, settings.shutdown_timeout_seconds + 10)
        if embedded_redis is not None:
            embedded_redis.stop()


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    # Its own process group: Ctrl-C reaches it through us, in order, and stopping the
    # group takes its pool children too. Should we die without stopping it (SIGKILL), it
    # dies too, and its pool children with it (worker/shutdown.py).
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        env={
            **os.environ,
            "TRAINJOB_HOME": str(settings.home.resolve()),
            "TRAINJOB_DATABASE_URL": settings.effective_database_url,
            "TRAINJOB_REDIS_URL": str(settings.redis_url),
        },
        start_new_session=True,
        preexec_fn=dies_with(os.getpid(), signal.SIGKILL),
    )


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to the worker's main process only: it hands its job back with a checkpoint
    (worker/shutdown.py) and exits. Then clear the group, pool children included."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _run_api(settings: Settings, host: str, port: int) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from app.main import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        # Open event streams and downloads would hold a graceful shutdown for as long as
        # their clients stay: cut them after this (`trainjob watch` reconnects elsewhere).
        timeout_graceful_shutdown=API_SHUTDOWN_SECONDS,
        # JSON: no handlers of uvicorn's own; its lines, access lines too, reach ours.
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
    )
    logging.getLogger("uvicorn.error").addFilter(_not_a_cut_stream)
    server = uvicorn.Server(config)
    sockets = None
    if port == 0:  # an ephemeral port: bind first so that we can say which
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        sockets = [sock]
    url = f"http://{host}:{port}"
    if settings.log_format == "json":  # every line of the output is then a JSON object
        logger.info("trainjob is serving at %s  (API docs: %s/docs)", url, url)
    else:
        print(f"trainjob is serving at {url}  (API docs: {url}/docs)", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the
    # handler it found. Make that handler raise, so our caller's cleanup (worker, Redis)
    # always runs, whatever handler this process inherited.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_stop)
    with contextlib.suppress(_Stop):
        server.run(sockets=sockets)
    return 0


def _not_a_cut_stream(record: logging.LogRecord) -> bool:
    """uvicorn logs a request cancelled by the graceful-shutdown timeout (an open event
    stream) as an application error with a traceback; it is the shutdown working."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, asyncio.CancelledError)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def worker_command(queues: str | None, concurrency: int, devices: str | None = None) -> int:
    if devices is not None:  # before the settings are read: the pool's children read them
        os.environ["TRAINJOB_WORKER_DEVICES"] = devices
    settings = get_settings()
    configure_logging(settings)
    send_celery_logs_to_root()
    problem = _cannot_start(settings)
    if problem:
        print(f"trainjob worker: {problem}", file=sys.stderr)
        return 2
    # Never initialise CUDA in the parent; NVML answers "is CUDA there?" without it.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from worker.celery_app import make_celery
    from worker.devices import worker_devices
    from worker.shutdown import install_graceful_shutdown

    try:
        owned = worker_devices(settings.worker_devices)
    except ValueError as error:
        print(f"trainjob worker: {error}", file=sys.stderr)
        return 2
    # Resolved once here: the pool's children (forked, settings and all) need no probe.
    os.environ["TRAINJOB_WORKER_DEVICES"] = owned.describe()
    get_settings.cache_clear()
    settings = get_settings()
    consumed = (queues or f"{settings.queue},{settings.files_queue}").split(",")
    if settings.queue in consumed:  # and the queues of jobs on up to as many devices
        consumed += [training_queue(settings.queue, n) for n in range(2, owned.count + 1)]

    celery = make_celery(settings)
    install_graceful_shutdown(settings)
    celery.worker_main(
        [
            # JSON logs: no banner, which is many lines of text.
            *(["--quiet"] if settings.log_format == "json" else []),
            "worker",
            "--loglevel", settings.log_level.upper(),
            # Training and file validations by default (the embedded worker of `serve` too).
            "--queues", ",".join(consumed),
            "--concurrency", str(concurrency),
            "--pool", "prefork",
            "--max-tasks-per-child", "1",
            # Unique per process: a shutting-down worker finds its jobs by this name.
            "--hostname", f"trainjob-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )  # fmt: skip
    return 0


def reaper_command() -> int:
    settings = get_settings()
    problem = _cannot_start(settings)
    if problem:
        print(f"trainjob reaper: {problem}", file=sys.stderr)
        return 2
    import redis

    from app.main import make_reaper
    from worker.celery_app import make_celery

    configure_logging(settings)
    # 0 turns off the API's reaper; this command is a reaper, so it keeps the default.
    interval = settings.reaper_interval_seconds or 10.0
    settings = settings.model_copy(update={"reaper_interval_seconds": interval})
    database = Database(settings.effective_database_url)
    assert settings.redis_url is not None  # _cannot_start said so
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    reaper = make_reaper(settings, database, make_celery(settings), client)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_stop)
    reaper.start()  # the API's own loop, in a thread: a failed pass is logged, then retried
    try:
        while True:
            signal.pause()
    except _Stop:
        return 0
    finally:
        reaper.stop()
        client.close()
        database.dispose()


def db_command(action: str, revision: str | None) -> int:
    from app.db import current_revision, downgrade, head_revision

    url = get_settings().effective_database_url
    if action == "upgrade":
        upgrade(url, revision or "head")
    elif action == "downgrade":
        downgrade(url, revision or "base")
    database = Database(url)
    try:
        current = current_revision(database.engine)
        print(f"database at revision {current} (code head {head_revision()})")
    finally:
        database.dispose()
    return 0
