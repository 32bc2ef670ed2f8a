"""The lease keeper: renews a worker's leases from a separate process.

A thread inside the worker cannot renew while a task holds the GIL in C code (a builtin loop,
a long regex, many pandas and numpy-object operations): measured here, a 0.86 s ``sum(range())``
kept a thread off the CPU for 0.91 s, and a task that holds the GIL longer than its lease would
be run twice. So a worker process pairs with a keeper process that holds its leases:

- the worker writes ``hold TASK TOKEN`` when it leases, ``drop TASK`` before it reports a task's
  result, ``info JSON`` for its heartbeat, and ``quit`` when it stops; which task it runs, with
  its time limit and attempt, it posts on a ``RunningBoard`` (a store per task, no message);
- the keeper renews every held lease each ``lease / 3`` seconds, sends the heartbeat, and writes
  ``lost TASK TOKEN`` when a renewal is refused (with the token: a task released and leased
  again has a new lease, which an old refusal must not void);
- every ``CANCEL_CHECK_SECONDS`` it asks whether the running task was cancelled. The worker tells
  the task itself (``Cancelled`` raised inside it); one still running ``CANCEL_GRACE_SECONDS``
  later is deaf to it (stuck in C code), so the keeper kills the worker, ends the task cancelled
  and gives the worker's other leases back uncharged: a cancel is never recorded as a crash. A
  task past its time limit (which the worker tells with ``TaskTimeout``) is killed the same way
  after the grace, and recorded as a failed attempt of type ``TaskTimeout``;
- a worker that is stopped (SIGSTOP) gets no renewals, so its leases expire as they should; a
  worker that dies takes its keeper with it (the keeper notices its parent is gone).

Linux only (it reads ``/proc`` for the worker's state); elsewhere the worker renews from a thread.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from . import defaults
from .backends.base import Lease
from .ids import job_of
from .records import seal_record
from .serialize import Signer, get_serializer


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


def renew_round(backend, held: dict[str, str], lock: threading.Lock, seconds: float) -> list[tuple[str, str]]:
    """Renew every lease in ``held`` (task_id -> token) once; the leases refused, which are taken
    out of ``held``.

    A refusal counts only if the task is still held under that token: the worker may have
    released the lease and leased the task again since the snapshot, and an old refusal must not
    void the new lease.
    """
    with lock:
        snapshot = list(held.items())
    lost = []
    for task_id, token in snapshot:
        try:
            renewed = backend.renew(task_id, token, seconds)
        except Exception:
            continue  # a passing storage error: the next round tries again
        if not renewed:
            with lock:
                if held.get(task_id) == token:
                    del held[task_id]
                    lost.append((task_id, token))
    return lost


class LostLeases:
    """The leases a renewer was refused, as (task_id, token): the worker drops a result whose
    lease another worker may hold now. Shared by the ``Renewer`` thread and ``LeaseKeeper``."""

    def __init__(self) -> None:
        self._lost: set[tuple[str, str]] = set()
        self._lost_lock = threading.Lock()

    def _mark_lost(self, task_id: str, token: str) -> None:
        with self._lost_lock:
            self._lost.add((task_id, token))

    def _forget_lost(self, task_ids: Iterable[str]) -> None:
        with self._lost_lock:
            if self._lost:
                gone = set(task_ids)
                self._lost = {lost for lost in self._lost if lost[0] not in gone}

    def has_lost(self, lease: Lease) -> bool:
        """True when a renewal of this very lease was refused: another worker may hold the task."""
        with self._lost_lock:
            return (lease.task_id, lease.token) in self._lost


class RunningBoard:
    """The task a worker runs, posted for its keeper in a small shared memory-mapped file: one
    store per task and no system call. (A pipe message per task woke the keeper thousands of
    times a second and cost a worker of quick tasks about a fifth of its throughput.)

    A post is ``u32 length | u32 crc32 | text``; a reader that catches one half-written sees a
    bad checksum and keeps what it read before.
    """

    SIZE = 1024
    _HEAD = struct.Struct("<II")

    def __init__(self, path: str, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)
        self._last = ""

    @classmethod
    def create(cls) -> RunningBoard:
        """A new board in a private temporary file (in memory, under /dev/shm, where there is one)."""
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="nbqueue-board-", dir=folder)
        os.close(fd)
        os.unlink(path)  # made again exclusively, 0600, by __init__
        return cls(path, create=True)

    def post(self, text: str) -> None:
        data = text.encode()[: self.SIZE - self._HEAD.size]
        self._map[self._HEAD.size : self._HEAD.size + len(data)] = data
        self._HEAD.pack_into(self._map, 0, len(data), zlib.crc32(data))

    def read(self) -> str:
        """The latest whole post ("" before the first)."""
        length, crc = self._HEAD.unpack_from(self._map, 0)
        data = bytes(self._map[self._HEAD.size : self._HEAD.size + min(length, self.SIZE - self._HEAD.size)])
        if zlib.crc32(data) == crc:
            self._last = data.decode(errors="replace")
        return self._last

    def close(self) -> None:
        self._map.close()


class LeaseKeeper(LostLeases):
    """The worker's side: the same interface as the in-process ``Renewer`` thread."""

    def __init__(
        self,
        url: str,
        lease_seconds: float,
        worker_id: str,
        insecure: bool = False,
        max_attempts: int = defaults.MAX_ATTEMPTS,
    ) -> None:
        super().__init__()
        # -c rather than -m: the package imports this module, and runpy warns about running it twice.
        run = "import sys; from nbqueue.keeper import main; sys.exit(main(sys.argv[1:]))"
        # The URL may hold a password: it goes in the environment, not in argv (visible to ps).
        self._cmd = [sys.executable, "-c", run, repr(lease_seconds), str(os.getpid()), worker_id]
        self._board = RunningBoard.create()
        self._cmd += ["1" if insecure else "0", str(max_attempts), self._board.path]
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._board.path)  # both have it mapped by now (or the keeper failed)
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
                self._mark_lost(task_id, token)

    def _send(self, lines: Iterable[str]) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            with self._lock:  # the worker's loop and its give-back thread both send
                self._proc.stdin.write("".join(f"{line}\n" for line in lines))
                self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the keeper is gone: leases then expire and are retried, as after a crash

    def hold(self, leases: list[Lease]) -> None:
        self._send(f"hold {lease.task_id} {lease.token}" for lease in leases)

    def drop(self, *task_ids: str) -> None:
        self._send(f"drop {task_id}" for task_id in task_ids)  # one write for a whole batch
        self._forget_lost(task_ids)

    def info(self, data: str) -> None:
        """The heartbeat's information (one JSON line)."""
        self._send([f"info {data}"])

    def running(self, lease: Lease, limit: float | None) -> None:
        """The task the worker starts now, and the seconds it may run: it runs until the next one
        starts or it is dropped."""
        shown = "-" if limit is None else repr(limit)
        self._board.post(f"{lease.task_id} {shown} {lease.attempt} {lease.charged}")

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
        self._board.close()


@dataclass
class _Running:
    """The task the worker runs, as the keeper knows it."""

    task_id: str
    started: float  #: monotonic, when the keeper saw it posted
    limit: float | None
    attempt: int
    charged: int
    cancelled_at: float | None = None  #: when the keeper found it cancelled


def main(argv: list[str]) -> int:
    """The keeper process, with arguments ``LEASE_SECONDS WORKER_PID WORKER_ID INSECURE
    MAX_ATTEMPTS BOARD_PATH`` and the queue URL in ``$NBQUEUE_URL``."""
    from .backends import open_backend
    from .errors import BackendUnavailable

    url = os.environ[defaults.ENV_URL]
    lease_seconds, worker_pid, worker_id = float(argv[0]), int(argv[1]), argv[2]
    insecure, max_attempts = argv[3] == "1", int(argv[4])
    board = RunningBoard(argv[5], create=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, which then says quit
    # A worker may start while its storage is down (a Redis restart): wait for it, as the worker
    # itself would, rather than fail the worker.
    delay = defaults.RECONNECT_FIRST
    while True:
        try:
            backend = open_backend(url)
            break
        except BackendUnavailable:
            if os.getppid() != worker_pid:
                return 0
            time.sleep(delay)
            delay = min(delay * 2, defaults.RECONNECT_MAX)
    print("ready", flush=True)
    held: dict[str, str] = {}
    info = b"{}"
    lock = threading.Lock()
    done = threading.Event()
    informed = threading.Event()  # the worker has said who it is: the first heartbeat can go
    posted, running = "", None  # the worker's latest post, and the task it names

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
    informed.wait(min(lease_seconds / 3, 2.0))  # beat at once, as the worker starts, not a round later
    tick = min(defaults.CANCEL_CHECK_SECONDS, lease_seconds / 3)
    renew_due = 0.0
    while True:
        if os.getppid() != worker_pid:
            return 0  # the worker died: its leases expire and are retried
        if _stopped(worker_pid):
            if done.wait(lease_seconds / 3):
                break
            continue  # a stopped worker must lose its leases
        now = time.monotonic()
        if now >= renew_due:
            renew_due = now + lease_seconds / 3
            for task_id, token in renew_round(backend, held, lock, lease_seconds):
                print(f"lost {task_id} {token}", flush=True)
            with contextlib.suppress(Exception):  # the heartbeat is informative: the next round beats again
                backend.heartbeat(worker_id, info, lease_seconds)
        latest = board.read()
        if latest != posted:
            posted = latest
            task_id, limit, attempt, charged = posted.split(" ")
            seconds = None if limit == "-" else float(limit)
            running = _Running(task_id, now, seconds, int(attempt), int(charged))
        with lock:
            task = running if running is not None and running.task_id in held else None
        if task is not None and task.cancelled_at is None:
            with contextlib.suppress(Exception):  # a storage hiccup: asked again next tick
                if backend.cancel_requested([task.task_id]):
                    task.cancelled_at = now
        if task is not None and _deaf(task, now):
            _kill_deaf_worker(backend, worker_pid, worker_id, task, held, lock, insecure, max_attempts)
            with contextlib.suppress(Exception):
                backend.heartbeat(worker_id, info, 0)
            backend.close()
            return 0
        if done.wait(tick):
            break
    with contextlib.suppress(Exception):
        backend.heartbeat(worker_id, info, 0)  # withdraw: this worker is gone
    backend.close()
    return 0


def _deaf(task: _Running, now: float) -> bool:
    """True once the running task was told to stop (cancelled, or past its limit) a grace period
    ago and still runs."""
    grace = defaults.CANCEL_GRACE_SECONDS
    if task.cancelled_at is not None and now - task.cancelled_at > grace:
        return True
    return task.limit is not None and now - task.started > task.limit + grace


def _kill_deaf_worker(
    backend,
    worker_pid: int,
    worker_id: str,
    task: _Running,
    held: dict[str, str],
    lock: threading.Lock,
    insecure: bool,
    max_attempts: int,
) -> None:
    """The worker's running task was told to stop a grace period ago and still runs (stuck in C
    code): kill the worker, end the task (cancelled when it was, else a failed attempt of type
    TaskTimeout) and give the worker's other leases back uncharged (released, not expired)."""
    why = "was cancelled" if task.cancelled_at is not None else f"ran past its time limit of {task.limit:g}s"
    grace = defaults.CANCEL_GRACE_SECONDS
    print(
        f"nbqueue lease keeper: task {task.task_id} {why} and still runs {grace:g}s after being told "
        f"(stuck in C code?): killing its worker {worker_pid}",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker_pid, signal.SIGKILL)
    with lock:
        leases = dict(held)
    for task_id, token in leases.items():
        with contextlib.suppress(Exception):  # unreported, a lease expires: run again, never lost
            if task_id != task.task_id:
                backend.release(task_id, token)
            elif task.cancelled_at is not None:
                backend.fail(task_id, token, b"", None)  # marked cancelled: it ends so
            else:
                backend.fail(task_id, token, *_timed_out(task, worker_id, insecure, max_attempts))


def _timed_out(
    task: _Running, worker_id: str, insecure: bool, max_attempts: int
) -> tuple[bytes, float | None]:
    """The failure of a task killed past its time limit: its signed record and its retry delay
    (None: out of attempts, dead)."""
    error = {
        "type": "TaskTimeout",
        "message": f"the task ran past its time limit of {task.limit:g}s and did not stop within "
        f"{defaults.CANCEL_GRACE_SECONDS:g}s: its worker process was killed",
        "traceback": "",
    }
    now = time.time()
    started = now - (time.monotonic() - task.started)
    record = seal_record(
        Signer.default(insecure),
        get_serializer("dill"),  # an error record holds no value
        task.task_id,
        job_of(task.task_id),
        error=error,
        attempt=task.attempt,
        started=started,
        finished=now,
        worker=worker_id,
    )
    return record, None if task.charged >= max_attempts else defaults.retry_delay(task.charged)
