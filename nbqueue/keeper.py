"""The lease keeper: renews a worker's leases from a separate process.

A thread inside the worker cannot renew while a task holds the GIL in C code (a builtin loop,
a long regex, many pandas and numpy-object operations): measured here, a 0.86 s ``sum(range())``
kept a thread off the CPU for 0.91 s, and a task that holds the GIL longer than its lease would
be run twice. So a worker process pairs with a keeper process that holds its leases:

- the worker writes ``hold TASK TOKEN`` when it leases, ``drop TASK`` before it reports a
  task's result, ``info JSON`` for its heartbeat, and ``quit`` when it stops;
- the keeper renews every held lease each ``lease / 3`` seconds, sends the heartbeat, and writes
  ``lost TASK TOKEN`` when a renewal is refused (with the token: a task released and leased
  again has a new lease, which an old refusal must not void);
- a worker that is stopped (SIGSTOP) gets no renewals, so its leases expire as they should; a
  worker that dies takes its keeper with it (the keeper notices its parent is gone).

Linux only (it reads ``/proc`` for the worker's state); elsewhere the worker renews from a thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

from . import defaults
from .backends.base import Lease


def available() -> bool:
    """True where the keeper can tell a stopped worker from a busy one."""
    return os.path.exists(f"/proc/{os.getpid()}/stat")


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


class LeaseKeeper:
    """The worker's side: the same interface as the in-process ``Renewer`` thread."""

    def __init__(self, url: str, lease_seconds: float, worker_id: str) -> None:
        self.lost: set[tuple[str, str]] = set()  # (task_id, token)
        # -c rather than -m: the package imports this module, and runpy warns about running it twice.
        run = "import sys; from nbqueue.keeper import main; sys.exit(main(sys.argv[1:]))"
        # The URL may hold a password: it goes in the environment, not in argv (visible to ps).
        self._cmd = [sys.executable, "-c", run, repr(lease_seconds), str(os.getpid()), worker_id]
        self._env = {**os.environ, defaults.ENV_URL: url}
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self._cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=self._env,
        )
        # Lease nothing before the keeper can renew: it says "ready" once its backend is open.
        first = self._proc.stdout.readline() if self._proc.stdout is not None else ""
        if first.strip() != "ready":
            self._proc.wait()
            raise RuntimeError(f"the lease keeper did not start (exit code {self._proc.returncode})")
        self._reader = threading.Thread(target=self._read, name="nbqueue-keeper-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind == "lost":
                task_id, _, token = rest.partition(" ")
                with self._lock:
                    self.lost.add((task_id, token))

    def _send(self, lines: Iterable[str]) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write("".join(f"{line}\n" for line in lines))
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the keeper is gone: leases then expire and are retried, as after a crash

    def hold(self, leases: list[Lease]) -> None:
        self._send(f"hold {lease.task_id} {lease.token}" for lease in leases)

    def drop(self, *task_ids: str) -> None:
        self._send(f"drop {task_id}" for task_id in task_ids)  # one write for a whole batch
        with self._lock:
            if self.lost:
                gone = set(task_ids)
                self.lost = {lost for lost in self.lost if lost[0] not in gone}

    def has_lost(self, lease: Lease) -> bool:
        """True when the keeper was refused a renewal of this very lease."""
        with self._lock:
            return (lease.task_id, lease.token) in self.lost

    def info(self, data: str) -> None:
        """The heartbeat's information (one JSON line)."""
        self._send([f"info {data}"])

    def stop(self) -> None:
        self._send(["quit"])
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    # A keeper already gone leaves a broken pipe: nothing left to tell it.
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
        if self._reader is not None:
            self._reader.join(5)


def main(argv: list[str]) -> int:
    """The keeper process, with arguments ``LEASE_SECONDS WORKER_PID WORKER_ID`` and the queue URL in
    ``$NBQUEUE_URL``."""
    from .backends import open_backend
    from .errors import BackendUnavailable

    url = os.environ[defaults.ENV_URL]
    lease_seconds, worker_pid, worker_id = float(argv[0]), int(argv[1]), argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, which then says quit
    # A worker may start while its storage is down (a Redis restart): wait for it, as the worker
    # itself would, rather than fail the worker.
    delay = 0.1
    while True:
        try:
            backend = open_backend(url)
            break
        except BackendUnavailable:
            if os.getppid() != worker_pid:
                return 0
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    print("ready", flush=True)
    held: dict[str, str] = {}
    info = b"{}"
    lock = threading.Lock()
    done = threading.Event()
    informed = threading.Event()  # the worker has said who it is: the first heartbeat can go

    def read_commands() -> None:
        nonlocal info
        for line in sys.stdin:
            kind, _, rest = line.rstrip("\n").partition(" ")
            with lock:
                if kind == "hold":
                    task_id, _, token = rest.partition(" ")
                    held[task_id] = token
                elif kind == "drop":
                    held.pop(rest, None)
                elif kind == "info":
                    info = rest.encode()
                    informed.set()
                elif kind == "quit":
                    break
        done.set()

    threading.Thread(target=read_commands, daemon=True).start()
    beat = getattr(backend, "heartbeat", None)
    informed.wait(min(lease_seconds / 3, 2.0))  # beat at once, as the worker starts, not a round later
    while True:
        if os.getppid() != worker_pid:
            return 0  # the worker died: its leases expire and are retried
        if _stopped(worker_pid):
            if done.wait(lease_seconds / 3):
                break
            continue  # a stopped worker must lose its leases
        with lock:
            snapshot = list(held.items())
        for task_id, token in snapshot:
            try:
                renewed = backend.renew(task_id, token, lease_seconds)
            except Exception:
                continue  # a passing storage error: the next round tries again
            if not renewed:
                with lock:
                    # The worker may have released this lease and leased the task again since
                    # the snapshot: only the lease still held is lost.
                    current = held.get(task_id) == token
                    if current:
                        del held[task_id]
                if current:
                    print(f"lost {task_id} {token}", flush=True)
        if beat is not None:
            try:
                beat(worker_id, info, lease_seconds)
            except Exception:
                pass  # the heartbeat is informative: the next round beats again
        if done.wait(lease_seconds / 3):
            break
    if beat is not None:
        try:
            beat(worker_id, info, 0)  # withdraw: this worker is gone
        except Exception:
            pass
    backend.close()
    return 0
