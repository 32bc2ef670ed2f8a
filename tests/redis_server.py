"""A private redis-server for tests: a free loopback port, its own directory, no persistence."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis

SHARED_PORT = 6379  # a shared instance may run there: tests never touch it
INSTALL_HINT = "redis-server is not on PATH; install it: apt-get install redis-server"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (never 6379)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != SHARED_PORT:
            return port


class RedisServer:
    """One ``redis-server`` subprocess bound to 127.0.0.1, with a fixed port and directory.

    Args:
        directory: where the server keeps its files (and its log, ``redis.log``).
        extra_args: more command line options, e.g. ``["--appendonly", "yes"]``; they come last,
            so they override the defaults.
    """

    def __init__(self, directory: Path, extra_args: list[str] | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.executable = executable
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def url(self, queue: str, db: int = 0, userinfo: str = "") -> str:
        """A queue URL on this server; ``userinfo`` is ``"user:password@"`` or empty."""
        return f"redis://{userinfo}127.0.0.1:{self.port}/{db}?queue={queue}"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client on this server (close it when done)."""
        import redis  # here, so that importing conftest does not import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING (after loading any AOF)."""
        args = [
            self.executable,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            *self.extra_args,
        ]  # fmt: skip
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        from redis import exceptions as probe_errors

        with self.client(socket_timeout=1, socket_connect_timeout=1, retry=None) as probe:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    if probe.ping():
                        return
                except (probe_errors.ConnectionError, probe_errors.TimeoutError):
                    pass  # not listening yet, or still loading its data (BusyLoadingError)
                if time.monotonic() > end:
                    self.kill()
                    pytest.fail(f"redis-server did not answer PING within {timeout} s: {self.log_tail()}")
                time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the server's log, for failure messages."""
        log = self.directory / "redis.log"
        if not log.exists():
            return "(no log)"
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
