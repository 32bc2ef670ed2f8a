"""This machine's processes: the ``host:pid`` id of a worker, whether a process lives, and a
set of worker processes started fresh (never forked from a kernel)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def worker_id() -> str:
    """``host:pid`` of this process, recorded with every result."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists on this machine (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to someone else
    return True


@contextlib.contextmanager
def spawn_pool(
    n: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``n`` fresh interpreters (``spawn``: a kernel is never forked) that never run the
    caller's script.

    multiprocessing's spawn imports the parent's ``__main__`` in each child, so a script without
    ``if __name__ == "__main__":`` would run again there and fail in multiprocessing's bootstrap.
    nbqueue's children need nothing from it (tasks travel by value), so while the pool starts and
    runs, ``__main__`` shows multiprocessing neither a file nor a module spec to import.
    """
    main = sys.modules.get("__main__")
    hidden: dict[str, Any] = {}
    if main is not None:
        for attr in ("__file__", "__spec__"):
            if getattr(main, attr, None) is not None:
                hidden[attr] = getattr(main, attr)
                setattr(main, attr, None)
    try:
        ctx = multiprocessing.get_context("spawn")  # explicit: never change the global method
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
            yield pool
    finally:
        for attr, value in hidden.items():
            setattr(main, attr, value)


def process_gone(producer: dict | None) -> bool:
    """True when the process ``{"host", "pid"}`` ran on this host and is gone."""
    if not producer or producer.get("host") != socket.gethostname():
        return False
    try:
        return not pid_alive(int(producer["pid"]))
    except (KeyError, ValueError, TypeError):
        return False


class WorkerProcesses:
    """A set of worker processes started fresh (not forked), in their own session so a kernel
    interrupt does not reach them."""

    def __init__(self, command: list[str], n: int, restart: bool = False, env: dict | None = None) -> None:
        self.command = command
        self.restart = restart
        self._env = {**os.environ, **(env or {})}
        self.procs = [self._start() for _ in range(n)]
        self._stopping = threading.Event()
        self._retired: set[int] = set()  # pids stopped on purpose: never replaced

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            self.command,
            env=self._env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> int:
        """How many are still running."""
        return sum(p.poll() is None for p in self.procs)

    def supervise(self, stop: threading.Event, killed_only: bool = False) -> int:
        """Wait for all to exit, restarting crashed ones (nonzero exit; with ``killed_only``,
        only those killed by a signal) if ``restart``; returns the number of crashes seen.
        Restarts back off so a poison task cannot spin the machine."""
        crashes = 0
        backoff = 0.5
        while not stop.is_set():
            running = False
            for i, p in enumerate(self.procs):
                code = p.poll()
                if code is None:
                    running = True
                elif p.pid in self._retired:
                    continue
                elif (code < 0 if killed_only else code != 0) and self.restart:
                    crashes += 1
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    if not stop.is_set():
                        self.procs[i] = self._start()
                        running = True
            if not running:
                break
            stop.wait(0.2)
        return crashes

    def keep_alive(self) -> None:
        """Replace, from a background thread, a worker killed by a signal (its lease keeper's kill
        of a task deaf to a cancel or its time limit, the OOM killer), until ``stop()``. Workers
        that exit by themselves (idle, drained, an error) are left gone."""
        threading.Thread(
            target=self.supervise, args=(self._stopping, True), name="nbqueue-keep-alive", daemon=True
        ).start()

    def stop(self, timeout: float = 30.0, pids: list[int] | None = None) -> None:
        """SIGTERM each (or those in ``pids``): they finish their running task; then SIGKILL
        what is left after ``timeout``."""
        if pids is None:
            self._stopping.set()  # no replacement for what is stopped on purpose
        chosen = [p for p in self.procs if pids is None or p.pid in pids]
        self._retired.update(p.pid for p in chosen)
        for p in chosen:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in chosen:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Wait for every process to exit; their exit codes."""
        return [p.wait(timeout) for p in self.procs]
