"""fq:// — the storage contract on a plain directory (local disk or a shared file system).

No server: every state change is an atomic ``rename``/``link``/``unlink`` of a name, and data is
written once, as immutable *segment* files (temp file + fsync + rename), so no reader ever sees
half a file and one batch costs one fsync however many tasks it holds.

Layout (every name is a hard link to a segment; a segment's bytes live while any link does)::

    nbqueue.json                              marks the directory as a queue (format version)
    queue/<ready_ms>.<attempts>.<job>.<seg>.<lo>-<hi>   tasks lo..hi-1 of a segment, queued
                                              (<attempts> is N, or Ns for a suspect: Lease.suspect)
    claim/<claim_ms>.<token>.<queue name>     a range being split into leases (milliseconds)
    leased/<deadline_ms>.<attempt>.<token>.<job>.<seg>.<k>   task k leased until the deadline
    completing/<leased name>                  a lease whose result is being linked (fenced)
    done/<job>/<task_id>                      the committed result (link to a result segment)
    dead/<attempts>.<job>.<seg>.<k>           a dead letter; its error record is in done/
    cancel/<job>/job, cancel/<job>/<task_id>  cancel marks (the whole job, one task): each a
                                              segment of one frame "*", the record a cancelled
                                              task ends with (done/ links to it)
    cancelled/<job>.<seg>.<k>                 a cancelled task's payload, kept for retry
    quarantine/<name>, quarantine/<name>.why  files that are not ours or do not parse
    fn/<digest>, jobs/<job_id>, joborder/<ns>.<job_id>, counters/<process>, tmp/
    workers/<worker_id>                       a worker's heartbeat: "<expires_ms>\n" + its info
    ran/<job>/<worker_id>                     an empty file: that worker ran tasks of the job

A lease is won by the one ``rename`` out of ``queue/`` that succeeds; renew, fail, release and
expiry each rename the lease name, so exactly one of them wins (the token fence). A commit links
the result into ``done/`` (a link never replaces a file, so one result at most) and then drops
the lease under whatever name a renewal gave it.

Deadlines come from the leasing machine's clock. On a shared file system, clock skew between
machines shortens or stretches leases by the skew: keep leases much longer than the skew
(minutes, with NTP-synced clocks, is safe).

Event counters (inserted, completed, failed, dead) are per-process files of cumulative deltas,
written after every state change and summed on read: O(number of processes), never a listing of
tasks. A process killed between a rename and its counter write leaves them off by that change
(at most one batch); ``rezero()`` recounts. The state counts, queued and leased, are read from
the names themselves: ``queue/`` holds one name per inserted batch or retried task and
``leased/`` one per lease, so the listing is short, and a killed worker can never leave phantom
leases or queued tasks that keep a burst worker waiting.

The copying verbs ``put_results`` and ``put_dead`` check every id first, then link the records
one by one: a process killed part-way leaves some of them written.

A full disk (or quota) raises StorageFull from the verb that met it, with nothing half-written:
data goes to a temp file first (unlinked when it cannot be written whole), and a verb that fails
after its first rename or link undoes what it did (``complete`` commits task by task: the tasks
before the one refused stay committed). An insert writes its counter file before its tasks become
visible, so a batch is queued and counted, or neither. Other verbs write counters after their
change; when the disk is full then, the change stands and its counts are written with the
process's next change (or when it closes). Renewals, leases and releases only rename.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import fcntl
import functools
import json
import os
import random
import shutil
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import FULL_ERRNOS, QueueURLError, StorageFull, UnsafeQueueError
from ..ids import (
    ID_PATTERN,
    IndexSet,
    check_batch,
    check_id,
    check_tasks_of,
    check_worker_id,
    index_of,
    job_of,
)
from . import segments
from .base import (
    COUNT_FIELDS,
    Backend,
    CommitWatch,
    Counts,
    DeadLetter,
    Lease,
    TaskInfo,
    TaskStatus,
    identity_changed,
)
from .dirwatch import DirectoryWatch, notifications_work

FORMAT = 1
MARKER = "nbqueue.json"
QUEUE_ID = "queue-id"
AREAS = (
    "queue",
    "claim",
    "leased",
    "completing",
    "done",
    "dead",
    "quarantine",
    "fn",
    "jobs",
    "joborder",
    "counters",
    "tmp",
    "workers",
    "priority",
    "cancel",
    "cancelled",
    "ran",
)
#: The name of a whole job's mark in cancel/<job>/ (never a task id: those end in -N).
JOB_MARK = "job"
#: The frame id of a record shared by every task linked to it (a cancel mark).
ANY_TASK = "*"
#: An orphaned claim or completing entry older than this was left by a killed process.
ORPHAN_SECONDS = 30.0
#: A completing/ name whose record is committed is dropped this long after its lease ended: the
#: committer needed microseconds, and the margin covers clock skew between machines.
COMPLETED_GRACE_SECONDS = 5.0
#: How often one process scans leased/ for expired leases while leasing.
RECLAIM_INTERVAL = 0.1
#: Records a reader of done/<job>/ takes per window (``read_commits``): grouped by result segment,
#: so each segment is parsed once per window; bounds the reader's memory (a few MB).
DONE_WINDOW = 32768
#: A worker picks among this many of the oldest ready ranges of a job, so workers rarely collide.
PICK_WINDOW = 8
#: A worker lists queue/ again at least this often, so a job inserted meanwhile gets its turn.
RELIST_SECONDS = 0.25
#: While another worker claims a range, the rest of it is out of queue/ for a moment: a lease
#: that finds nothing ready waits for claims younger than this to settle before saying "empty".
CLAIM_SETTLE_SECONDS = 0.5


#: A process folds its counter file into the shared base once it grows past this.
COUNTER_FILE_FOLD_BYTES = 64 * 1024


def _subtract(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per-key, per-field ``a - b`` of two counter delta tables."""
    return {key: {f: v - b.get(key, {}).get(f, 0) for f, v in row.items()} for key, row in a.items()}


#: A renewal in another process can rename a lease between our lookup and our move: look again
#: this many times (renewals come every lease/3 seconds, so one retry nearly always suffices).
_MOVE_TRIES = 4


def _single(ready_ms: int, attempts: str, job: str, seg: str, k: int | str) -> str:
    """The queue/ name of one task (task k of a segment) ready at ``ready_ms``."""
    return f"{ready_ms:013d}.{attempts}.{job}.{seg}.{k}-{int(k) + 1}"


def _attempts(field: str) -> tuple[int, bool]:
    """The attempts field of a name: ``3``, or ``3s`` once the task is a suspect (a lease of it
    expired: ``Lease.suspect``). Raises ValueError for anything else."""
    suspect = field.endswith("s")
    count = int(field[:-1] if suspect else field)
    if count < 0:
        raise ValueError(f"negative attempts {field!r}")
    return count, suspect


def _field(attempts: int, suspect: bool) -> str:
    """The attempts field for a name (see ``_attempts``)."""
    return f"{attempts}s" if suspect else str(attempts)


def _job_of_range(name: str) -> str:
    """The job field of a queue/ name (``ready.attempts.job.seg.range``; "" if it has none)."""
    parts = name.split(".", 3)
    return parts[2] if len(parts) > 3 else ""


def _now_ms() -> int:
    return int(time.time() * 1000)


F = TypeVar("F", bound=Callable[..., Any])


def _is_full(exc: BaseException) -> bool:
    """A full disk or quota not yet said as StorageFull."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS and not isinstance(exc, StorageFull)


def _full_translated(method: F) -> F:
    """Raise a full disk met anywhere in ``method`` (a link or rename needing a directory block
    too) as StorageFull."""

    @functools.wraps(method)
    def wrapper(self: FileBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if _is_full(exc):
                raise self._storage_full(exc) from exc
            raise

    return wrapper  # type: ignore[return-value]


def _runs(items: list[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    """``(k, name)`` items sorted by k, cut into runs of consecutive k: each run can go back to
    the queue as one range name."""
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i][0] != items[i - 1][0] + 1:
            yield items[start:i]
            start = i


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def open_file(url: str) -> FileBackend:
    """``fq://PATH`` → a FileBackend on PATH (relative paths are from the working directory)."""
    path = url.split("://", 1)[1]
    if not path:
        raise QueueURLError(f"{url!r} names no directory: use fq://PATH")
    return FileBackend(path)


_open_backends: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _fold_counters_at_exit() -> None:
    """Every process folds its counters when it exits normally, so counter files stay few."""
    for backend in list(_open_backends):
        with contextlib.suppress(Exception):
            backend.close()


class _DoneWatch(CommitWatch):
    """New names in done/<job>/: the job's commits."""

    def __init__(
        self,
        watch: DirectoryWatch,
        read_record: Callable[[str], bytes | None],
        read_counts: Callable[[], Counts],
    ) -> None:
        self.watch, self.read_record, self.read_counts = watch, read_record, read_counts
        # Commits from before the watch began wake the first wait (as on redis://, where the log
        # is read from its start): looked for after the watch is on, so none falls in between.
        with os.scandir(watch.path) as names:
            self.committed_before = next(names, None) is not None

    def wait(self, timeout: float) -> bool:
        if self.committed_before:
            self.committed_before = False
            return True
        return self.watch.wait(timeout)

    def close(self) -> None:
        self.watch.close()


class _DoneScan:
    """A cursor along done/<job>/: the task indices already returned, and the directory pass
    under way (a directory has no order to resume from; a pass after the last one catches what
    landed behind it)."""

    def __init__(self) -> None:
        self.returned = IndexSet()
        self.entries: Any = None  # os.scandir of done/<job>/ while a pass is under way
        self.exhausted = False  # the pass under way reached its end
        self.pending: collections.deque[tuple[str, bytes]] = collections.deque()  # read, not returned

    def seen(self, task_id: str) -> bool:
        try:
            return index_of(task_id) in self.returned
        except (ValueError, IndexError):
            return True  # not a task's name: never returned


class FileBackend(Backend):
    """A queue in a directory. Safe for many processes on many machines sharing the directory."""

    blocking_lease = True  # woken by inotify on a local disk; a short poll on a shared one

    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(path))
        self.url = f"fq://{self.root}"
        self._open_root()
        self._dirs = {area: os.path.join(self.root, area) for area in AREAS}
        self._lease_names: dict[str, str] = {}  # token -> current leased/ name
        # Cached listing of queue/: each job's ranges, sorted by ready time (see _next_range).
        self._ranges: dict[str, list[str]] = {}
        self._listed = 0.0  # when _ranges was listed
        self._last_job = ""  # the job served last: the next lease starts with the one after it
        self._priorities: dict[str, int] = {}  # job -> priority, as read from priority/
        self._last_reclaim = 0.0
        self._counter_pid = -1
        self._deltas: dict[str, dict[str, int]] = {}
        self._flushed: dict[str, dict[str, int]] = {}  # the deltas as last written
        self._counting = (os.getpid(), threading.Lock())  # see _counted
        # inotify only where the kernel sees every write: not on a shared mount (see dirwatch).
        self._notify = notifications_work(self.root)
        _open_backends.add(self)

    # -- opening and safety ---------------------------------------------------------------------
    def _open_root(self) -> None:
        root = self.root
        if os.path.exists(root) and not os.path.isdir(root):
            raise QueueURLError(f"queue path {root!r} is a file, not a directory")
        if not os.path.exists(root):
            try:
                os.makedirs(root, mode=0o700)
            except OSError as exc:
                raise QueueURLError(f"cannot create queue directory {root!r}: {exc.strerror}") from exc
        st = os.stat(root)
        if st.st_uid != os.geteuid():
            raise UnsafeQueueError(f"queue directory {root!r} belongs to another user (uid {st.st_uid})")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeQueueError(
                f"queue directory {root!r} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 700 {root}"
            )
        marker = os.path.join(root, MARKER)
        if not os.path.exists(marker):
            if os.listdir(root):
                raise QueueURLError(f"{root!r} is not empty and is not an nbqueue queue directory")
            self._write_atomic(marker, json.dumps({"format": FORMAT}).encode(), tmp_dir=root)
        for area in AREAS:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(root, area), 0o700)

    def _storage_full(self, exc: OSError) -> StorageFull:
        why = (exc.strerror or "no space left").lower()
        return StorageFull(
            exc.errno, f"queue {self.url}: {why}; nothing was half-written: free space, then retry"
        )

    def _write_atomic(self, path: str, data: bytes, tmp_dir: str | None = None, sync: bool = True) -> None:
        tmp = self._write_tmp(data, tmp_dir, sync)
        try:
            os.rename(tmp, path)
        except BaseException as exc:
            _unlink_all([tmp])
            if _is_full(exc):  # a rename may need a directory block too
                raise self._storage_full(exc) from exc  # type: ignore[arg-type]
            raise

    def _write_tmp(self, data: bytes, tmp_dir: str | None = None, sync: bool = True) -> str:
        """Write ``data`` whole to a new temp file (its path); a full disk raises StorageFull and
        leaves no temp file behind."""
        tmp = os.path.join(tmp_dir or self._dirs["tmp"], f".{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)  # close can report a full disk too (delayed allocation)
        except BaseException as exc:
            _unlink_all([tmp])
            if _is_full(exc):
                raise self._storage_full(exc) from exc  # type: ignore[arg-type]
            raise
        return tmp

    def _path(self, area: str, *names: str) -> str:
        # Names are our own (never absolute, never '..'): plain joining is safe and much cheaper.
        return "/".join((self._dirs[area], *names))

    # -- counters -------------------------------------------------------------------------------
    def _counter_file(self) -> str:
        return self._path("counters", f"{socket.gethostname()}.{os.getpid()}.{id(self):x}")

    def _bump(self, job_id: str, **delta: int) -> None:
        if self._counter_pid != os.getpid():  # forked: start our own file
            self._counter_pid, self._deltas, self._flushed = os.getpid(), {}, {}
        for key in {"", job_id}:
            row = self._deltas.setdefault(key, {})
            for name, d in delta.items():
                row[name] = row.get(name, 0) + d

    def _flush(self) -> None:
        if self._counter_pid != os.getpid() or self._deltas == self._flushed:
            return  # nothing counted since the last write
        path = self._counter_file()
        self._drop_rezeroed()
        data = json.dumps(self._deltas).encode()
        if len(data) > COUNTER_FILE_FOLD_BYTES:  # a long-lived worker that touched many jobs
            self.close()
            return
        try:
            self._write_atomic(path, data, sync=False)
        except StorageFull:
            return  # the change is made; deltas are cumulative, so the next write counts it
        self._flushed = {key: dict(row) for key, row in self._deltas.items()}

    @contextlib.contextmanager
    def _counted(self, job_id: str, **delta: int) -> Iterator[None]:
        """Count ``delta`` for the change the block makes visible, so that both happen or neither:
        the counter file is written (to a temp file) before the block and renamed into place
        after it. A full disk raises StorageFull before the block runs; a block that raises
        counts nothing."""
        # One insert of this process at a time: counts snapshot while another thread's batch was
        # counted, and then refused, would write that batch's counts.
        if self._counting[0] != os.getpid():  # forked: the lock may have been held by a thread
            self._counting = (os.getpid(), threading.Lock())
        with self._counting[1]:
            if self._counter_pid == os.getpid() and len(json.dumps(self._deltas)) > COUNTER_FILE_FOLD_BYTES:
                self.close()
            self._bump(job_id, **delta)
            try:
                self._drop_rezeroed()
                snapshot = {key: dict(row) for key, row in self._deltas.items()}
                staged = self._write_tmp(json.dumps(snapshot).encode(), sync=False)
            except BaseException:
                self._bump(job_id, **{name: -d for name, d in delta.items()})
                raise
            try:
                yield
            except BaseException:
                self._bump(job_id, **{name: -d for name, d in delta.items()})
                _unlink_all([staged])
                raise
            try:
                os.rename(staged, self._counter_file())
            except OSError:
                _unlink_all([staged])
                return  # the change is made and counted in memory: the next write counts it
            self._flushed = snapshot

    def _read_counters(self) -> list[dict]:
        rows: list[dict] = []
        try:
            names = os.listdir(self._dirs["counters"])
        except FileNotFoundError:
            return rows
        for name in names:
            if name.startswith("."):
                continue
            try:
                with open(self._path("counters", name), "rb") as f:
                    rows.append(json.loads(f.read()))
            except (OSError, ValueError):
                continue  # folded away meanwhile, or not ours
        return rows

    def _sum(self, key: str) -> Counts:
        counts = Counts()
        for row in self._read_counters():
            for name, value in row.get(key, {}).items():
                if name in COUNT_FIELDS:
                    setattr(counts, name, getattr(counts, name) + value)
        return counts

    def __del__(self) -> None:
        # A handle dropped before exit folds its counters too (atexit only sees live handles).
        # Builtins only: at interpreter shutdown module globals may already be gone.
        try:
            self.close()
        except Exception:
            pass

    def _drop_rezeroed(self) -> None:
        """If rezero() removed our counter file, its recount holds what we had written: keep only
        the changes since."""
        if self._flushed and not os.path.exists(self._counter_file()):
            self._deltas = _subtract(self._deltas, self._flushed)
            self._flushed = {}

    @contextlib.contextmanager
    def _counters_locked(self) -> Iterator[None]:
        """Serialize the writers of counters/base (close and rezero) across processes."""
        lock_path = self._path("counters", ".lock")
        with open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def close(self) -> None:
        """Fold this process's counter deltas into the shared base file (also done at exit)."""
        if self._counter_pid != os.getpid() or not self._deltas or not os.path.isdir(self.root):
            return
        with self._counters_locked():
            self._drop_rezeroed()
            base_path = self._path("counters", "base")
            try:
                with open(base_path, "rb") as f:
                    base = json.loads(f.read())
            except (OSError, ValueError):
                base = {}
            for key, row in self._deltas.items():
                target = base.setdefault(key, {})
                for name, value in row.items():
                    target[name] = target.get(name, 0) + value
            try:
                self._write_atomic(base_path, json.dumps(base).encode(), sync=False)
            except StorageFull:
                # Not folded: our counter file stays, and every reader still sums it. Changes it
                # lacks are lost if this process exits before the disk has room (rezero recounts).
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._counter_file())
        self._deltas, self._flushed = {}, {}

    # -- names ----------------------------------------------------------------------------------
    @staticmethod
    def _parse_queued(name: str) -> tuple[int, str, str, str, int, int]:
        ready, attempts, job, seg, span = name.split(".")
        lo, hi = span.split("-")
        _attempts(attempts)  # checked; kept as the field, which carries the suspect mark
        return int(ready), attempts, job, seg, int(lo), int(hi)

    @staticmethod
    def _parse_leased(name: str) -> tuple[int, str, str, str, str, int]:
        deadline, attempt, token, job, seg, k = name.split(".")
        _attempts(attempt)  # checked; kept as the field, which carries the suspect mark
        return int(deadline), attempt, token, job, seg, int(k)

    def _find_lease(self, token: str) -> str | None:
        """The leased/ name of a token: this process's record of it, else a scan of leased/.
        A recorded name may be stale; the rename that uses it then fails and we scan."""
        name = self._lease_names.get(token)
        if name is not None:
            return name
        return self._scan_lease(token)

    def _scan_lease(self, token: str) -> str | None:
        marker = f".{token}."
        for name in os.listdir(self._dirs["leased"]):
            if marker in name and name.split(".")[2] == token:  # the token field, not any field
                self._lease_names[token] = name
                return name
        return None

    def _read_frames(self, path: str, lo: int = 0, hi: int | None = None) -> list[tuple[str, bytes]]:
        with open(path, "rb") as f:
            return segments.read(f, lo, hi)

    def _link_done(self, src: str, job: str, task_id: str) -> str:
        """Link a record into done/<job>/ (FileExistsError: one is there already); its path.

        The job's directory is made on first need, never cached: another process's purge
        removes it.
        """
        path = self._path("done", job, task_id)
        try:
            os.link(src, path)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self._path("done", job), 0o700)
            os.link(src, path)
        return path

    def _quarantine(self, area: str, name: str, why: str) -> None:
        # Set aside even on a full disk; dead() then says only "quarantined", not why.
        with contextlib.suppress(FileNotFoundError, StorageFull):
            os.rename(self._path(area, name), self._path("quarantine", name))
            self._write_atomic(self._path("quarantine", name + ".why"), why.encode(), sync=False)

    # -- functions and jobs ---------------------------------------------------------------------
    @_full_translated
    def put_function(self, digest: str, blob: bytes) -> None:
        check_id(digest, "digest")
        path = self._path("fn", digest)
        if not os.path.exists(path):
            self._write_atomic(path, blob)

    def get_function(self, digest: str) -> bytes:
        check_id(digest, "digest")
        try:
            with open(self._path("fn", digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(digest) from None

    @_full_translated
    def put_job(self, job_id: str, meta: bytes) -> None:
        check_id(job_id, "job id")
        path = self._path("jobs", job_id)
        new = not os.path.exists(path)
        self._write_atomic(path, meta)
        if new:
            order = self._path("joborder", f"{time.time_ns():020d}.{job_id}")
            try:
                os.close(os.open(order, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                with contextlib.suppress(OSError):  # unlisted, the record could never be found
                    os.unlink(path)
                raise

    def get_job(self, job_id: str) -> bytes | None:
        check_id(job_id, "job id")
        try:
            with open(self._path("jobs", job_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def list_jobs(self) -> list[str]:
        seen: dict[str, None] = {}
        for name in sorted(os.listdir(self._dirs["joborder"])):
            _, _, job_id = name.partition(".")
            if job_id and ID_PATTERN.match(job_id):  # anything else is not ours
                seen.setdefault(job_id, None)
        return list(seen)

    # -- tasks ----------------------------------------------------------------------------------
    @_full_translated
    def insert(
        self,
        job_id: str,
        tasks: Sequence[tuple[str, bytes]],
        delay: float = 0.0,
        priority: int = 0,
        record: bytes | None = None,
        queue_id: str | None = None,
    ) -> None:
        check_batch(job_id, tasks)
        if queue_id is not None:
            current = self._read_queue_id()
            if current != queue_id:
                raise identity_changed(queue_id, current)
        if not tasks:
            if record is not None:
                self.put_job(job_id, record)
            return
        if priority and self._priorities.get(job_id) != priority:
            # Written before any of the job's tasks is visible: a worker never guesses 0 for it.
            self._write_atomic(self._path("priority", job_id), str(int(priority)).encode())
            self._priorities[job_id] = int(priority)
        n = len(tasks)
        tmp = self._write_tmp(segments.encode(tasks))
        seg = os.urandom(8).hex()
        try:
            # Counted before visible: a full disk refuses the batch whole, never queues it uncounted.
            with self._counted(job_id, inserted=n):
                ready = _now_ms() + int(max(delay, 0.0) * 1000)  # the name says when it is ready
                os.rename(tmp, self._path("queue", f"{ready:013d}.0.{job_id}.{seg}.0-{n}"))
        except BaseException:
            _unlink_all([tmp])
            raise
        if record is not None:
            self.put_job(job_id, record)

    @_full_translated
    def lease(self, n: int, seconds: float, wait: float = 0.0) -> list[Lease]:
        leases = self._lease_once(n, seconds)
        if leases or wait <= 0:
            return leases
        end = time.monotonic() + wait
        # Watch queue/ before looking again, so an insert in between wakes the wait at once.
        with contextlib.closing(DirectoryWatch(self._dirs["queue"], self._notify)) as watch:
            while True:
                leases = self._lease_once(n, seconds)
                remaining = end - time.monotonic()
                if leases or remaining <= 0:
                    return leases
                # Tasks that become ready later (a delay, a retry's backoff) and expired leases
                # make no new name: wake for the first of those, and look at least every second.
                due = self._next_ready_ms()
                block = min(remaining, 1.0 if due is None else max((due - _now_ms()) / 1000, 0.001))
                if watch.wait(block):
                    self._listed = 0.0  # a new name: list queue/ again

    def _next_ready_ms(self) -> int | None:
        """When the earliest range in the cached listing of queue/ becomes ready."""
        firsts = [int(names[0][:13]) for names in self._ranges.values() if names]
        return min(firsts, default=None)

    def _lease_once(self, n: int, seconds: float) -> list[Lease]:
        if time.monotonic() - self._last_reclaim >= RECLAIM_INTERVAL:
            self._reclaim()
        settle_until = time.monotonic() + CLAIM_SETTLE_SECONDS
        while True:
            leases = self._lease_listed(n, seconds)
            # Between another worker's claim (a rename out of queue/) and its giving back the
            # rest of the range, the job looks empty: an answer of "nothing ready" then would
            # send a worker of several queues on to a lower one while this one still has tasks.
            if leases or not self._claims_in_flight() or time.monotonic() >= settle_until:
                return leases
            time.sleep(0.002)
            self._listed = 0.0

    def _claims_in_flight(self) -> bool:
        """Whether another worker is in the middle of claiming a range (a young claim/ entry)."""
        young = f"{_now_ms() - int(CLAIM_SETTLE_SECONDS * 1000):013d}"
        return any(name[:13] >= young for name in os.listdir(self._dirs["claim"]))

    def _lease_listed(self, n: int, seconds: float) -> list[Lease]:
        leases: list[Lease] = []
        relists = 0
        while len(leases) < n:
            if not self._ranges or time.monotonic() - self._listed > RELIST_SECONDS:
                if relists == 2:
                    break
                self._ranges, self._listed = self._list_ranges(), time.monotonic()
                relists += 1
            name = self._next_range(f"{_now_ms():013d}")
            if name is None:
                if relists:
                    break
                self._ranges = {}
                continue
            self._ranges[_job_of_range(name)].remove(name)
            claimed = self._claim(name, n - len(leases), seconds)
            if not claimed:
                # Another worker took it: the listing is stale (its turn may have moved on, or
                # the rest of that range has a new name): list again rather than serve a job
                # whose turn it is not.
                self._listed = 0.0
            leases += claimed
        return leases

    def _next_range(self, now: str) -> str | None:
        """A ready range of the job whose turn it is: of the highest priority, the job after the
        one served last (job ids sort by creation, so jobs take turns in order); at random among
        its oldest few ranges, so workers rarely collide. Costs one step per job, not per range."""
        ready = [job for job, names in self._ranges.items() if names and names[0][:13] <= now]
        if not ready:
            return None
        top = max(self._priority_of(job) for job in ready)
        turn = sorted(job for job in ready if self._priority_of(job) == top)
        job = next((j for j in turn if j > self._last_job), turn[0])
        self._last_job = job
        return random.choice([name for name in self._ranges[job][:PICK_WINDOW] if name[:13] <= now])

    def _priority_of(self, job: str) -> int:
        known = self._priorities.get(job)
        if known is None:
            try:
                with open(self._path("priority", job), "rb") as f:
                    known = int(f.read())
            except (OSError, ValueError):  # none given, or not a job of ours
                known = 0
            self._priorities[job] = known
        return known

    def _list_ranges(self) -> dict[str, list[str]]:
        """queue/ by job, each job's ranges sorted by ready time; a name that does not start
        with one is not ours."""
        names = []
        for name in os.listdir(self._dirs["queue"]):
            if name[:13].isdigit():
                names.append(name)
            else:  # it would never be ready, so never claimed: quarantine it now
                self._quarantine(
                    "queue", name, "foreign file in queue/: its name is not an nbqueue task range"
                )
        by_job: dict[str, list[str]] = {}
        for name in sorted(names):
            by_job.setdefault(_job_of_range(name), []).append(name)
        return by_job

    def _claim(self, name: str, want: int, seconds: float) -> list[Lease]:
        try:
            ready, attempts, job, seg, lo, hi = self._parse_queued(name)
            check_id(job, "job id")
        except ValueError:
            self._quarantine("queue", name, "foreign file in queue/: its name is not an nbqueue task range")
            return []
        claim = f"{_now_ms():013d}.{os.urandom(8).hex()}.{name}"
        try:
            os.rename(self._path("queue", name), self._path("claim", claim))
        except FileNotFoundError:
            return []  # another worker won it
        claim_path = self._path("claim", claim)
        take = min(want, hi - lo)
        try:
            frames = self._read_frames(claim_path, lo, lo + take) if lo < hi else []
            if len(frames) != take:
                raise segments.CorruptSegment(f"range {lo}-{hi} is outside the segment")
        except (segments.CorruptSegment, OSError) as exc:
            self._quarantine("claim", claim, f"unreadable task segment {name}: {exc}")
            return []
        leases = []
        rest_linked = ended = False
        try:
            if take < hi - lo:  # give the rest back before taking ours, so a crash loses nothing
                rest = f"{ready:013d}.{attempts}.{job}.{seg}.{lo + take}-{hi}"
                os.link(claim_path, self._path("queue", rest))
                rest_linked = True
                bisect.insort(self._ranges.setdefault(job, []), rest)  # its turn goes on from there
            deadline = f"{_now_ms() + int(seconds * 1000):013d}"
            count, suspect = _attempts(attempts)
            marks = self._cancel_marks(job)
            for k in range(lo, lo + take):
                mark = self._mark_of(frames[k - lo][0], marks)
                if mark is not None:  # marked cancelled: never handed out, it ends here
                    with contextlib.suppress(FileExistsError):
                        self._link_done(mark, job, frames[k - lo][0])
                        self._keep_cancelled(claim_path, job, seg, k)
                        self._bump(job, cancelled=1)
                        ended = True
                    continue
                token = os.urandom(8).hex()
                leased = f"{deadline}.{_field(count + 1, suspect)}.{token}.{job}.{seg}.{k}"
                os.link(claim_path, self._path("leased", leased))
                self._lease_names[token] = leased
                task_id, payload = frames[k - lo]
                leases.append(Lease(task_id, token, count + 1, payload, suspect))
            os.unlink(claim_path)
        except FileNotFoundError:
            # Another process took the claim for an orphan (we were paused or cut off beyond
            # ORPHAN_SECONDS) and queues what we had not linked: keep what we linked.
            pass
        except OSError:
            # A link refused (a full disk that needed a directory block): lease none of it, so no
            # attempt is spent, and queue our part again as it was. Should even that rename fail,
            # the orphan repair queues the claim after ORPHAN_SECONDS.
            for lease in leases:
                _unlink_all([self._path("leased", self._lease_names.pop(lease.token))])
            back = f"{ready:013d}.{attempts}.{job}.{seg}.{lo}-{lo + take}" if rest_linked else name
            with contextlib.suppress(OSError):
                os.rename(claim_path, self._path("queue", back))
            raise
        if ended:
            self._flush()
        return leases

    def _move_lease(self, token: str, area: str, new_name: str | None = None) -> str | None:
        """Rename a lease out of leased/ (the fence); returns its old name, or None if stale."""
        name = self._find_lease(token)
        try:
            for _ in range(_MOVE_TRIES):
                if name is None:
                    return None
                try:
                    os.rename(self._path("leased", name), self._path(area, new_name or name))
                    return name
                except FileNotFoundError:
                    # Renewed meanwhile by another process (the lease keeper), or gone: look again.
                    self._lease_names.pop(token, None)
                    name = self._scan_lease(token)
            return None
        finally:
            self._lease_names.pop(token, None)

    @_full_translated
    def renew(self, task_id: str, token: str, seconds: float) -> bool:
        name = self._find_lease(token)
        if name is None:
            return False
        _, attempt, _, job, seg, k = self._parse_leased(name)
        renewed = f"{_now_ms() + int(seconds * 1000):013d}.{attempt}.{token}.{job}.{seg}.{k}"
        if self._move_lease(token, "leased", renewed) is None:
            return False
        self._lease_names[token] = renewed
        return True

    @_full_translated
    def complete(self, items: Sequence[tuple[str, str, bytes]]) -> list[bool]:
        """Commit a batch: one result segment (one fsync), then per task three metadata calls.

        Per task: the lease is renamed into completing/ (the fence: a reclaim or a renewal racing
        it wins or loses whole, so a result never lands for a lease another worker holds now);
        the result is linked into done/ (a link never replaces, so at most one is ever
        committed); then the completing/ name is unlinked. A committer killed in between is
        repaired by the next reclaim (``_repair_completing``).
        """
        if not items:
            return []
        tmp = self._write_tmp(segments.encode([(task_id, result) for task_id, _, result in items]))
        out = []
        try:
            for task_id, token, _ in items:
                out.append(self._commit(task_id, token, tmp))
        finally:
            os.unlink(tmp)
        self._flush()
        return out

    def _commit(self, task_id: str, token: str, record_path: str, counted: str = "completed") -> bool:
        moved = self._move_lease(token, "completing")
        if moved is None:
            return False  # stale token: changes nothing
        job = job_of(task_id)
        try:
            self._link_done(record_path, job, task_id)
            committed = True
        except FileExistsError:
            committed = False  # a result is already committed: never a second one
        except OSError:
            # A full disk that needed a directory block: the lease goes back, the commit can be retried.
            with contextlib.suppress(OSError):
                os.rename(self._path("completing", moved), self._path("leased", moved))
            raise
        if committed and counted == "cancelled":
            _, _, _, _, seg, k = self._parse_leased(moved)
            self._keep_cancelled(self._path("completing", moved), job, seg, k)
        with contextlib.suppress(FileNotFoundError):  # repaired already (we were paused)
            os.unlink(self._path("completing", moved))
        if committed:
            self._bump(job, **{counted: 1})
        return committed

    @_full_translated
    def fail(self, task_id: str, token: str, error: bytes, retry_in: float | None) -> TaskStatus | None:
        name = self._find_lease(token)
        if name is None:
            return None
        ended = self._end_if_marked(task_id, token)
        if ended is not None:
            return TaskStatus.CANCELLED if ended else None
        _, attempt, _, job, seg, k = self._parse_leased(name)
        if retry_in is not None:
            again = _single(_now_ms() + int(retry_in * 1000), attempt, job, seg, k)
            if self._move_lease(token, "queue", again) is None:
                return None
            self._bump(job, failed=1)
            self._flush()
            return TaskStatus.QUEUED
        tmp = self._write_tmp(segments.encode([(task_id, error)]))
        try:
            # The name that moved, not the one looked up above: a renewal (the lease keeper, in
            # another process) may have renamed the lease in between.
            moved = self._move_lease(token, "completing")
            if moved is None:
                return None
            recorded = False
            try:
                with contextlib.suppress(FileExistsError):
                    self._link_done(tmp, job, task_id)
                    recorded = True
                letter = f"{_attempts(attempt)[0]}.{job}.{seg}.{k}"
                os.rename(self._path("completing", moved), self._path("dead", letter))
            except OSError:
                # A full disk part-way: the lease goes back as it was, so the report can be retried.
                _unlink_all([self._path("done", job, task_id)] if recorded else [])
                with contextlib.suppress(OSError):  # else the completing/ repair queues it again
                    os.rename(self._path("completing", moved), self._path("leased", moved))
                raise
        finally:
            os.unlink(tmp)
        self._bump(job, failed=1, dead=1)
        self._flush()
        return TaskStatus.DEAD

    @_full_translated
    def release(self, task_id: str, token: str) -> bool:
        name = self._find_lease(token)
        if name is None:
            return False
        ended = self._end_if_marked(task_id, token)
        if ended is not None:
            return ended
        _, attempt, _, job, seg, k = self._parse_leased(name)
        count, suspect = _attempts(attempt)
        back = _single(_now_ms(), _field(count - 1, suspect), job, seg, k)
        return self._move_lease(token, "queue", back) is not None

    # -- cancelling -----------------------------------------------------------------------------
    def _cancel_marks(self, job: str) -> dict[str, str] | None:
        """The job's cancel marks, name -> path (``JOB_MARK`` or a task id); None when it has none
        (one system call: the common case)."""
        folder = self._path("cancel", job)
        try:
            return {name: f"{folder}/{name}" for name in os.listdir(folder) if not name.startswith(".")}
        except FileNotFoundError:
            return None

    def _end_if_marked(self, task_id: str, token: str) -> bool | None:
        """A lease coming back without a result (``fail``, ``release``): a task marked cancelled
        ends so, committed as a commit is (True; False for a stale token). None: not marked."""
        mark = self._mark_of(task_id, self._cancel_marks(job_of(task_id)))
        if mark is None:
            return None
        ended = self._commit(task_id, token, mark, counted="cancelled")
        self._flush()
        return ended

    @staticmethod
    def _mark_of(task_id: str, marks: dict[str, str] | None) -> str | None:
        """The mark (a record segment) a task ends cancelled with, or None."""
        if not marks:
            return None
        return marks.get(task_id) or marks.get(JOB_MARK)

    @_full_translated
    def cancel(self, job_id: str, record: bytes, task_ids: Sequence[str] | None = None) -> int:
        check_id(job_id, "job id")
        chosen = None if task_ids is None else set(check_tasks_of(job_id, task_ids))
        folder = self._path("cancel", job_id)
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        tmp = self._write_tmp(segments.encode([(ANY_TASK, bytes(record))]))
        try:
            for name in [JOB_MARK] if chosen is None else sorted(chosen):
                os.link(tmp, f"{folder}/.{name}")  # then renamed: a mark appears whole
                os.rename(f"{folder}/.{name}", f"{folder}/{name}")
        finally:
            _unlink_all([tmp])
        # Marked first, so a worker that leases a waiting task from now on ends it instead.
        ended = 0
        for name in os.listdir(self._dirs["queue"]):
            if f".{job_id}." in name and _job_of_range(name) == job_id:
                ended += self._cancel_range(name, chosen)
        self._flush()
        return ended

    def _cancel_range(self, name: str, chosen: set[str] | None) -> int:
        """End the tasks of a queued range that are ``chosen`` (all with None) cancelled; the rest
        go back as they were. Claimed first, as a worker claims: a worker that took it first wins."""
        ready, attempts, job, seg, lo, hi = self._parse_queued(name)
        claim = f"{_now_ms():013d}.{os.urandom(8).hex()}.{name}"
        try:
            os.rename(self._path("queue", name), self._path("claim", claim))
        except FileNotFoundError:
            return 0  # leased meanwhile: it is marked, so it ends when its lease comes back
        claim_path = self._path("claim", claim)
        frames = self._read_frames(claim_path, lo, hi)
        marks = self._cancel_marks(job)
        ended = 0
        kept: list[tuple[int, str]] = []
        for k, (task_id, _) in zip(range(lo, hi), frames, strict=True):
            mark = self._mark_of(task_id, marks) if chosen is None or task_id in chosen else None
            if mark is None:
                kept.append((k, task_id))
                continue
            with contextlib.suppress(FileExistsError):
                self._link_done(mark, job, task_id)
                self._keep_cancelled(claim_path, job, seg, k)
                ended += 1
        # The tasks kept go back with their ready time and attempts, as runs of neighbours.
        for run in _runs(kept):
            back = f"{ready:013d}.{attempts}.{job}.{seg}.{run[0][0]}-{run[-1][0] + 1}"
            os.link(claim_path, self._path("queue", back))
        os.unlink(claim_path)
        self._bump(job, cancelled=ended)
        return ended

    def _keep_cancelled(self, segment: str, job: str, seg: str, k: int) -> None:
        """Keep a cancelled task's payload (task ``k`` of ``segment``) for ``retry``."""
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.link(segment, self._path("cancelled", f"{job}.{seg}.{k}"))

    def _cancelled_entries(self, job: str) -> Iterator[tuple[str, str, bytes]]:
        """(cancelled/ name, task_id, payload) of each cancelled task of ``job`` kept for retry."""
        for name in sorted(os.listdir(self._dirs["cancelled"])):
            if not name.startswith(f"{job}."):
                continue
            try:
                k = int(name.rsplit(".", 1)[1])
                task_id, payload = self._read_frames(self._path("cancelled", name), k, k + 1)[0]
            except (OSError, ValueError, IndexError, segments.CorruptSegment):
                continue
            yield name, task_id, payload

    def failed_payloads(self, job_id: str) -> dict[str, bytes]:
        check_id(job_id, "job id")
        found = {task_id: payload for _, task_id, _, payload in self._dead_entries(job_id)}
        found.update((task_id, payload) for _, task_id, payload in self._cancelled_entries(job_id))
        return found

    @_full_translated
    def retry(self, job_id: str, tasks: Sequence[tuple[str, bytes]]) -> int:
        check_batch(job_id, tasks)
        if not tasks:
            return 0
        dead = {task_id: name for name, task_id, _, _ in self._dead_entries(job_id)}
        cancelled = {task_id: name for name, task_id, _ in self._cancelled_entries(job_id)}
        for task_id, _ in tasks:
            if task_id not in dead and task_id not in cancelled:
                raise ValueError(f"task {task_id!r} did not end dead or cancelled: it cannot be retried")
        # The new payloads are written whole first; then the old ends go, then the range appears.
        tmp = self._write_tmp(segments.encode([(task_id, bytes(payload)) for task_id, payload in tasks]))
        try:
            marks = self._path("cancel", job_id)
            _unlink_all([f"{marks}/{JOB_MARK}"] + [f"{marks}/{task_id}" for task_id, _ in tasks])
            for task_id, _ in tasks:
                if task_id in dead:
                    _unlink_all([self._path("dead", dead[task_id])])
                    self._bump(job_id, dead=-1)
                else:
                    _unlink_all([self._path("cancelled", cancelled[task_id])])
                    self._bump(job_id, cancelled=-1)
                _unlink_all([self._path("done", job_id, task_id)])
            seg = os.urandom(8).hex()
            os.rename(tmp, self._path("queue", f"{_now_ms():013d}.0.{job_id}.{seg}.0-{len(tasks)}"))
        except BaseException:
            _unlink_all([tmp])
            raise
        self._flush()
        return len(tasks)

    def cancel_requested(self, task_ids: Sequence[str]) -> set[str]:
        marks_of: dict[str, dict[str, str] | None] = {}
        marked = set()
        for task_id in task_ids:
            job = job_of(task_id)
            if job not in marks_of:
                marks_of[job] = self._cancel_marks(job)
            if self._mark_of(task_id, marks_of[job]) is not None:
                marked.add(task_id)
        return marked

    def _reclaim(self, force: bool = False) -> int:
        """Return expired leases to the queue and repair what killed processes left behind."""
        self._last_reclaim = time.monotonic()
        now = _now_ms()
        moved = 0
        staged: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
        for name in sorted(os.listdir(self._dirs["leased"])):
            try:
                deadline, attempt, _, job, seg, k = self._parse_leased(name)
            except ValueError:
                self._quarantine("leased", name, "foreign file in leased/")
                continue
            if deadline > now and not force:
                break  # sorted by deadline: the rest are live
            # A live lease taken back by force is a release, not a crash: its attempt is given back.
            # An expired one keeps its attempt and makes the task a suspect (Lease.suspect).
            marks = self._cancel_marks(job)
            if marks and self._end_cancelled_lease(name, marks):
                moved += 1
                continue
            count, suspect = _attempts(attempt)
            charged = _field(count, True) if deadline <= now else _field(count - 1, suspect)
            # Into claim/ first (the rename is the fence, as in a worker's claim; should we die
            # now, the orphan repair queues it), so neighbours can go back as one range.
            claim = f"{_now_ms():013d}.{os.urandom(8).hex()}.{_single(now, charged, job, seg, k)}"
            try:
                os.rename(self._path("leased", name), self._path("claim", claim))
            except FileNotFoundError:
                continue
            staged.setdefault((job, seg, charged), []).append((k, claim))
            moved += 1
        for (job, seg, charged), claims in staged.items():
            self._requeue_runs(now, job, seg, charged, sorted(claims))
        orphan_before = now - int(ORPHAN_SECONDS * 1000)
        for name in os.listdir(self._dirs["claim"]):
            try:
                claimed_ms, _, original = name.split(".", 2)
                self._parse_queued(original)
                claimed = int(claimed_ms)
            except ValueError:
                self._quarantine("claim", name, "foreign file in claim/")
                continue
            if claimed < orphan_before:  # a process died splitting a range
                self._repair_claim(name, original)
        for name in os.listdir(self._dirs["completing"]):
            self._repair_completing(name, orphan_before)
        self._flush()  # a repaired commit counts as completed
        return moved

    def _end_cancelled_lease(self, name: str, marks: dict[str, str]) -> bool:
        """An expired lease of a job with cancel marks: if its task is marked, it ends cancelled
        (True) instead of going back to the queue. Renamed into completing/ first, the fence a
        commit uses, so a late commit or a renewal racing it wins or loses whole."""
        k = self._parse_leased(name)[5]
        try:
            task_id = self._read_frames(self._path("leased", name), k, k + 1)[0][0]
        except (OSError, IndexError, segments.CorruptSegment):
            return False
        mark = self._mark_of(task_id, marks)
        if mark is None:
            return False
        try:
            os.rename(self._path("leased", name), self._path("completing", name))
        except FileNotFoundError:
            return True  # renewed, committed or reclaimed meanwhile: not ours to move
        _, _, _, job, seg, _ = self._parse_leased(name)
        with contextlib.suppress(FileExistsError):
            self._link_done(mark, job, task_id)
            self._keep_cancelled(self._path("completing", name), job, seg, k)
            self._bump(job, cancelled=1)
        os.unlink(self._path("completing", name))
        return True

    def _requeue_runs(self, now: int, job: str, seg: str, field: str, claims: list[tuple[int, str]]) -> None:
        """Queue reclaimed tasks (``claims``: task k of the segment and its claim/ name) again,
        each run of consecutive tasks as one range: leasing 1,000 released tasks then costs a few
        claims, not a thousand.

        Each claim is renamed once more first: should this reclaim have stalled past
        ORPHAN_SECONDS, another process's orphan repair may have taken some (it renames a claim
        before queuing it), and the rename that wins decides who queues the task.
        """
        kept = []
        for k, claim in claims:
            fresh = f"{_now_ms():013d}.{os.urandom(8).hex()}.{claim.split('.', 2)[2]}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self._path("claim", claim), self._path("claim", fresh))
                kept.append((k, fresh))
        for run in _runs(kept):
            lo, hi = run[0][0], run[-1][0] + 1
            try:
                os.link(
                    self._path("claim", run[0][1]),
                    self._path("queue", f"{now:013d}.{field}.{job}.{seg}.{lo}-{hi}"),
                )
            except OSError:
                # No room for the range's name (a full disk): each task goes back on its own.
                for k, claim in run:
                    with contextlib.suppress(OSError):
                        os.rename(
                            self._path("claim", claim), self._path("queue", _single(now, field, job, seg, k))
                        )
                continue
            _unlink_all([self._path("claim", claim) for _, claim in run])

    def _repair_claim(self, claim: str, original: str) -> None:
        """Queue again the tasks of an orphaned claim that are nowhere else.

        The dead claimer may have linked the rest of the range back and some leases before it
        died; those tasks are accounted for (a lease of it may since have expired, run or been
        committed), and queuing the whole range again would run them twice.
        """
        ready, attempts, job, seg, lo, hi = self._parse_queued(original)
        # Re-claim it under a fresh name first: one repairer at a time, and should this process
        # die too, the next repair finds it after ORPHAN_SECONDS again.
        mine = f"{_now_ms():013d}.{os.urandom(8).hex()}.{original}"
        try:
            os.rename(self._path("claim", claim), self._path("claim", mine))
        except FileNotFoundError:
            return  # another process repairs it
        path = self._path("claim", mine)
        # Listed in the order tasks move (queue, claim, leased, completing, dead, done): a task
        # moving on while we list is seen where it went. Only a lease returned to queue/ meanwhile
        # can be missed, and it is then queued twice: run again, never lost.
        accounted: set[int] = set()
        ours = f".{job}.{seg}."
        for area in ("queue", "claim", "leased", "completing", "dead"):
            for name in os.listdir(self._dirs[area]):
                if ours not in name or name == mine:
                    continue
                with contextlib.suppress(ValueError, IndexError):
                    if area in ("leased", "completing"):
                        accounted.add(self._parse_leased(name)[5])
                    elif area == "dead":
                        accounted.add(int(name.rsplit(".", 1)[1]))
                    else:
                        queued = name.split(".", 2)[2] if area == "claim" else name
                        _, _, _, _, q_lo, q_hi = self._parse_queued(queued)
                        accounted.update(range(q_lo, q_hi))
        missing = [k for k in range(lo, hi) if k not in accounted]
        try:
            frames = self._read_frames(path, lo, hi) if missing else []
        except (segments.CorruptSegment, OSError) as exc:
            self._quarantine("claim", mine, f"unreadable task segment {original}: {exc}")
            return
        now = _now_ms()
        for k in missing:
            task_id = frames[k - lo][0]
            if os.path.exists(self._path("done", job, task_id)):
                continue  # committed (its lease is gone)
            with contextlib.suppress(FileExistsError):
                os.link(path, self._path("queue", _single(max(now, ready), attempts, job, seg, k)))
        os.unlink(path)

    def _repair_completing(self, name: str, orphan_before: int) -> None:
        """A commit or failure report whose process died part-way: drop the name once the record
        is in (soon after the lease ended), or queue the task again (after ORPHAN_SECONDS)."""
        try:
            deadline, attempt, _, job, seg, k = self._parse_leased(name)
        except ValueError:
            self._quarantine("completing", name, "foreign file in completing/")
            return
        # Found by the kill-storm soak: waiting ORPHAN_SECONDS here too left a committed task
        # counted as leased for half a minute after its worker was killed.
        if deadline >= _now_ms() - int(COMPLETED_GRACE_SECONDS * 1000):
            return
        path = self._path("completing", name)
        try:
            task_id = self._read_frames(path, k, k + 1)[0][0]
        except (OSError, segments.CorruptSegment, IndexError):
            return
        if os.path.exists(self._path("done", job, task_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                self._bump(job, completed=1)
        elif deadline < orphan_before:
            # Its committer died with it: a crash like any other, so the task becomes a suspect.
            suspect = _field(_attempts(attempt)[0], True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, self._path("queue", _single(_now_ms(), suspect, job, seg, k)))

    # -- reads ----------------------------------------------------------------------------------
    def counts(self) -> Counts:
        return self._with_states(self._sum(""), None)

    def job_counts(self, job_id: str) -> Counts:
        return self._with_states(self._sum(job_id), job_id)

    def _with_states(self, counts: Counts, job: str | None) -> Counts:
        counts.queued, counts.leased, counts.scheduled = self._state_counts(job)
        return counts

    def _state_counts(self, job: str | None) -> tuple[int, int, int]:
        """Ready, leased and scheduled tasks (of ``job``, else of the queue), exactly, from the
        names (a queue/ name says when its tasks are ready).

        A range being claimed counts as queued: while it is split into leases its tasks may also
        show as leased for a moment, but a range whose claimer was killed still counts until the
        orphan repair queues it again (a burst worker waits for it).
        """
        mark = None if job is None else f".{job}."
        queued = leased = scheduled = 0
        now = f"{_now_ms():013d}"
        for area in ("queue", "claim", "leased", "completing"):
            try:
                names = os.listdir(self._dirs[area])
            except FileNotFoundError:  # purged this moment
                continue
            for name in names:
                if mark is not None and mark not in name:
                    continue
                try:
                    if area in ("leased", "completing"):
                        found = self._parse_leased(name)[3]
                        n = 1
                    else:
                        _, _, found, _, lo, hi = self._parse_queued(
                            name.split(".", 2)[2] if area == "claim" else name
                        )
                        n = hi - lo
                except (ValueError, IndexError):
                    continue  # not ours: quarantined by the next lease
                if job is not None and found != job:
                    continue
                if area in ("leased", "completing"):
                    leased += n
                elif area == "queue" and name[:13] > now:
                    scheduled += n
                else:
                    queued += n
        return queued, leased, scheduled

    def results(self, job_id: str) -> dict[str, bytes]:
        check_id(job_id, "job id")
        done_dir = self._path("done", job_id)
        try:
            names = os.listdir(done_dir)
        except FileNotFoundError:
            return {}
        by_inode: dict[int, dict[str, bytes]] = {}
        out = {}
        for task_id in names:
            path = os.path.join(done_dir, task_id)
            try:
                ino = os.stat(path).st_ino
                if ino not in by_inode:
                    by_inode[ino] = dict(self._read_frames(path))
                frames = by_inode[ino]
                out[task_id] = frames[task_id] if task_id in frames else frames[ANY_TASK]
            except (OSError, KeyError, segments.CorruptSegment):
                continue
        return out

    def record(self, task_id: str) -> bytes | None:
        # Read from the task's own done/ link, not the job's listing.
        try:
            frames = self._read_frames(self._path("done", job_of(task_id), task_id))
        except (OSError, segments.CorruptSegment):
            return None
        return next((data for frame_id, data in frames if frame_id in (task_id, ANY_TASK)), None)

    def exact_job_finished(self, job_id: str) -> int:
        try:
            return len(os.listdir(self._path("done", check_id(job_id, "job id"))))
        except FileNotFoundError:
            return 0

    # -- watching -------------------------------------------------------------------------------
    def watch_commits(self, job_id: str) -> CommitWatch:
        done_dir = self._path("done", check_id(job_id, "job id"))
        with contextlib.suppress(FileExistsError):
            os.mkdir(done_dir, 0o700)
        return _DoneWatch(
            DirectoryWatch(done_dir, self._notify), self.record, functools.partial(self.job_counts, job_id)
        )

    def read_commits(
        self, job_id: str, cursor: object | None, limit: int
    ) -> tuple[list[tuple[str, bytes]], object]:
        scan = _DoneScan() if cursor is None else cursor
        assert isinstance(scan, _DoneScan), "a cursor of this backend"
        out: list[tuple[str, bytes]] = []
        while len(out) < limit:
            if scan.pending:
                out.append(scan.pending.popleft())
                continue
            if scan.exhausted:
                break
            done_dir = self._path("done", check_id(job_id, "job id"))
            if scan.entries is None:
                try:
                    scan.entries = os.scandir(done_dir)
                except FileNotFoundError:
                    return out, scan
            self._read_window(scan, done_dir)
        if scan.exhausted and not scan.pending:
            scan.exhausted = False  # this pass is over; the next call starts another
        return out, scan

    def _read_window(self, scan: _DoneScan, done_dir: str) -> None:
        """Read the next ``DONE_WINDOW`` unseen records of a pass into ``scan.pending``, each
        result segment once: names come in hash order, so grouping them by segment is what
        keeps a reader from parsing a 64-record segment for every record."""
        by_segment: dict[int, list[str]] = {}
        taken = 0
        for entry in scan.entries:
            if not scan.seen(entry.name):
                try:
                    by_segment.setdefault(entry.inode(), []).append(entry.name)
                except OSError:
                    continue
                taken += 1
                if taken >= DONE_WINDOW:
                    break
        else:
            scan.entries.close()
            scan.entries, scan.exhausted = None, True
        for names in by_segment.values():
            try:
                frames = dict(self._read_frames(os.path.join(done_dir, names[0])))
            except (OSError, segments.CorruptSegment):
                continue  # gone meanwhile (a retry, a purge): read on a later pass if it comes back
            for name in names:
                record = frames.get(name, frames.get(ANY_TASK))
                if record is not None:
                    scan.returned.add(index_of(name))
                    scan.pending.append((name, record))

    # -- admin ----------------------------------------------------------------------------------
    @_full_translated
    def release_all(self, force: bool = False) -> int:
        return self._reclaim(force=force)

    def purge(self) -> None:
        # A new identity first: a worker that reads a task still being deleted refuses it.
        self._write_atomic(os.path.join(self.root, QUEUE_ID), os.urandom(16).hex().encode())
        # The areas themselves stay: workers and waiters of other processes list and watch them
        # meanwhile. Their entries move out of sight at once (one rename each) and are deleted
        # from there. tmp/ is left alone: it holds other processes' writes under way (a write
        # that lands after this is signed for the old identity, or is a record nobody reads).
        trash = os.path.join(self.root, f".purge.{os.getpid()}.{os.urandom(6).hex()}")
        os.mkdir(trash, 0o700)
        try:
            for area in AREAS:
                if area == "tmp":
                    continue
                for name in os.listdir(self._dirs[area]):
                    with contextlib.suppress(FileNotFoundError):  # taken by a worker meanwhile
                        os.rename(self._path(area, name), os.path.join(trash, f"{area}.{name}"))
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        self._deltas, self._flushed, self._ranges, self._lease_names = {}, {}, {}, {}
        self._priorities, self._last_job = {}, ""

    def _read_queue_id(self) -> str | None:
        """The queue's identity, or None while it has none (never made here)."""
        try:
            with open(os.path.join(self.root, QUEUE_ID), "rb") as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def queue_id(self) -> str:
        path = os.path.join(self.root, QUEUE_ID)
        current = self._read_queue_id()
        if current is not None:
            return current
        # Made once, race-free: a link never replaces, so every process reads the first one made.
        tmp = self._write_tmp(os.urandom(16).hex().encode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(path, "rb") as f:
            return f.read().decode()

    @_full_translated
    def rezero(self) -> Counts:
        self._reclaim()
        rows: dict[str, dict[str, int]] = {}

        def add(job: str, field: str, n: int) -> None:
            for key in ("", job):
                row = rows.setdefault(key, dict.fromkeys(COUNT_FIELDS, 0))
                row[field] += n

        dead_by_job: dict[str, int] = {}
        for name in os.listdir(self._dirs["dead"]):
            parts = name.split(".")
            if len(parts) != 4:
                continue  # not a dead letter of ours
            dead_by_job[parts[1]] = dead_by_job.get(parts[1], 0) + 1
            add(parts[1], "dead", 1)
        for job in os.listdir(self._dirs["done"]):
            marks = {os.stat(path).st_ino for path in (self._cancel_marks(job) or {}).values()}
            names = os.listdir(self._path("done", job))
            cancelled = sum(os.stat(self._path("done", job, n)).st_ino in marks for n in names if marks)
            add(job, "cancelled", cancelled)
            add(job, "completed", len(names) - cancelled - dead_by_job.get(job, 0))
        counters = self._dirs["counters"]
        with self._counters_locked():
            # The recount is written before any counter file goes: a full disk changes nothing.
            recount = self._write_tmp(json.dumps(rows).encode(), sync=False)
            try:
                for name in os.listdir(counters):
                    if not name.startswith(".") and name != "base":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(counters, name))
                os.rename(recount, os.path.join(counters, "base"))
            except BaseException:
                _unlink_all([recount])
                raise
        self._deltas, self._flushed = {}, {}
        return self.counts()

    def _dead_entries(self, job: str | None = None) -> Iterator[tuple[str, str, int, bytes]]:
        """(dead/ name, task_id, attempts, payload) for each dead letter (of ``job`` only)."""
        for name in sorted(os.listdir(self._dirs["dead"])):
            try:
                attempts, letter_job, _, k = name.split(".")
                if job is not None and letter_job != job:
                    continue
                task_id, payload = self._read_frames(self._path("dead", name), int(k), int(k) + 1)[0]
            except (OSError, ValueError, IndexError, segments.CorruptSegment):
                continue
            yield name, task_id, int(attempts), payload

    def dead(self) -> list[DeadLetter]:
        letters = []
        for _, task_id, attempts, payload in self._dead_entries():
            letters.append(DeadLetter(task_id, attempts, payload, self.record(task_id)))
        for name in sorted(os.listdir(self._dirs["quarantine"])):
            if name.endswith(".why"):
                continue
            try:
                with open(self._path("quarantine", name + ".why"), "rb") as f:
                    why = f.read()
            except FileNotFoundError:
                why = b"quarantined"
            with open(self._path("quarantine", name), "rb") as f:
                letters.append(DeadLetter(f"quarantine/{name}", 0, f.read(), why))
        return letters

    @_full_translated
    def redrive(self, task_ids: Sequence[str] | None = None) -> int:
        wanted = None if task_ids is None else set(task_ids)
        moved = 0
        for name, task_id, _, _ in list(self._dead_entries()):
            if wanted is not None and task_id not in wanted:
                continue
            _, job, seg, k = name.split(".")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path("done", job, task_id))
            try:
                again = _single(_now_ms(), "0", job, seg, k)
                os.rename(self._path("dead", name), self._path("queue", again))
            except FileNotFoundError:
                continue
            self._bump(job, dead=-1)
            moved += 1
        self._flush()
        return moved

    @_full_translated
    def purge_dead(self, task_ids: Sequence[str] | None = None) -> int:
        wanted = None if task_ids is None else set(task_ids)
        removed = 0
        for name, task_id, _, _ in list(self._dead_entries()):
            if wanted is not None and task_id not in wanted:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path("dead", name))
                # The job keeps counting it as dead: its error record stays with the job.
                self._bump("", dead=-1)
                removed += 1
        for name in os.listdir(self._dirs["quarantine"]):
            if wanted is None or f"quarantine/{name}" in wanted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path("quarantine", name))
        self._flush()
        return removed

    # -- inspection -----------------------------------------------------------------------------
    def _leased_frame(self, area: str, name: str) -> tuple[int, str, tuple[str, bytes]]:
        """``(deadline_ms, attempts field, (task_id, payload))`` of a leased/ or completing/ name."""
        deadline, attempt, _, _, _, k = self._parse_leased(name)
        return deadline, attempt, self._read_frames(self._path(area, name), k, k + 1)[0]

    def peek_queued(self, n: int) -> list[tuple[str, bytes]]:
        now = f"{_now_ms():013d}"
        out: list[tuple[str, bytes]] = []
        for name in sorted(os.listdir(self._dirs["queue"])):
            if len(out) >= n or name[:13] > now:  # sorted by ready time: the rest are not ready
                break
            try:
                _, _, _, _, lo, hi = self._parse_queued(name)
                out += self._read_frames(self._path("queue", name), lo, min(hi, lo + n - len(out)))
            except (OSError, ValueError, segments.CorruptSegment):
                continue  # leased meanwhile, or foreign (lease() quarantines those)
        return out

    def lease_deadlines(self, limit: int) -> list[tuple[str, float]]:
        now = _now_ms()
        out: list[tuple[str, float]] = []
        for name in sorted(os.listdir(self._dirs["leased"])):  # names start with the deadline
            if len(out) >= limit:
                break
            try:
                deadline, _, (task_id, _) = self._leased_frame("leased", name)
            except (OSError, ValueError, IndexError, segments.CorruptSegment):
                continue  # renewed or finished meanwhile
            out.append((task_id, (deadline - now) / 1000))
        return out

    def find_task(self, task_id: str) -> TaskInfo | None:
        """Scans the areas in the order tasks move through them (queue, claim, leased,
        completing, dead, done), so a task moving forward meanwhile is still found."""
        check_id(task_id, "task id")
        job = job_of(task_id)
        for area in ("queue", "claim"):
            for name in os.listdir(self._dirs[area]):
                queued = name.split(".", 2)[-1] if area == "claim" else name  # claim: ms.token.<name>
                try:
                    _, attempts, range_job, _, lo, hi = self._parse_queued(queued)
                    if range_job != job:
                        continue
                    frames = dict(self._read_frames(self._path(area, name), lo, hi))
                except (OSError, ValueError, segments.CorruptSegment):
                    continue
                if task_id in frames:
                    return TaskInfo(task_id, TaskStatus.QUEUED, _attempts(attempts)[0], frames[task_id])
        now = _now_ms()
        for area in ("leased", "completing"):
            for name in os.listdir(self._dirs[area]):
                if f".{job}." not in name:
                    continue
                try:
                    deadline, attempt, (found, payload) = self._leased_frame(area, name)
                except (OSError, ValueError, IndexError, segments.CorruptSegment):
                    continue
                if found == task_id:
                    left = (deadline - now) / 1000
                    return TaskInfo(task_id, TaskStatus.LEASED, _attempts(attempt)[0], payload, left)
        for _, found, dead_attempts, payload in self._dead_entries(job):
            if found == task_id:
                return TaskInfo(task_id, TaskStatus.DEAD, dead_attempts, payload)
        try:
            ino = os.stat(self._path("done", job, task_id)).st_ino
        except FileNotFoundError:
            return None
        mark = self._mark_of(task_id, self._cancel_marks(job))
        cancelled = mark is not None and os.stat(mark).st_ino == ino
        return TaskInfo(task_id, TaskStatus.CANCELLED if cancelled else TaskStatus.COMPLETED, 0, None)

    # -- workers --------------------------------------------------------------------------------
    @_full_translated
    def heartbeat(self, worker_id: str, info: bytes, ttl: float) -> None:
        path = self._path("workers", check_worker_id(worker_id))
        if ttl <= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        expires = _now_ms() + int(ttl * 1000)
        self._write_atomic(path, b"%d\n" % expires + bytes(info), sync=False)

    @_full_translated
    def add_job_worker(self, job_id: str, worker_id: str) -> None:
        job_dir = self._path("ran", check_id(job_id, "job id"))
        with contextlib.suppress(FileExistsError):
            os.mkdir(job_dir, 0o700)
        path = os.path.join(job_dir, check_worker_id(worker_id))
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def job_workers(self, job_id: str) -> set[str]:
        try:
            return set(os.listdir(self._path("ran", check_id(job_id, "job id"))))
        except FileNotFoundError:
            return set()

    def workers(self) -> dict[str, bytes]:
        now = _now_ms()
        out = {}
        for name in os.listdir(self._dirs["workers"]):
            path = self._path("workers", name)
            try:
                with open(path, "rb") as f:
                    head, _, info = f.read().partition(b"\n")
                expires = int(head)
            except (OSError, ValueError):
                continue
            if expires > now:
                out[name] = info
            elif expires < now - ORPHAN_SECONDS * 1000:  # a worker that died without withdrawing
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return out

    # -- copying between queues -----------------------------------------------------------------
    def iter_queued(self) -> Iterator[tuple[str, bytes]]:
        for name in sorted(os.listdir(self._dirs["queue"])):
            try:
                _, _, _, _, lo, hi = self._parse_queued(name)
                frames = self._read_frames(self._path("queue", name), lo, hi)
            except (OSError, ValueError, segments.CorruptSegment):
                continue
            yield from frames

    def iter_leased(self) -> Iterator[tuple[str, bytes]]:
        for name in sorted(os.listdir(self._dirs["leased"])):
            try:
                yield self._leased_frame("leased", name)[2]
            except (OSError, ValueError, IndexError, segments.CorruptSegment):
                continue  # finished meanwhile

    def iter_functions(self) -> Iterator[tuple[str, bytes]]:
        for digest in sorted(os.listdir(self._dirs["fn"])):
            with contextlib.suppress(FileNotFoundError, KeyError, ValueError):
                yield digest, self.get_function(digest)

    def _refuse_recorded(self, job_id: str, task_ids: list[str]) -> None:
        for task_id in task_ids:
            if os.path.exists(self._path("done", job_id, task_id)):
                raise ValueError(f"task {task_id!r} already has a record")

    @_full_translated
    def put_results(self, job_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        check_batch(job_id, items)
        self._refuse_recorded(job_id, [task_id for task_id, _ in items])
        if not items:
            return
        records = self._write_tmp(segments.encode(items))
        linked: list[str] = []
        try:
            for task_id, _ in items:
                linked.append(self._link_done(records, job_id, task_id))
        except BaseException:
            _unlink_all(linked)  # a full disk part-way: none of the batch, as for a refused one
            raise
        finally:
            os.unlink(records)
        self._bump(job_id, inserted=len(items), completed=len(items))
        self._flush()

    @_full_translated
    def put_dead(self, job_id: str, letters: Sequence[DeadLetter]) -> None:
        check_batch(job_id, [(d.task_id, d.payload) for d in letters])
        if any(d.error is None for d in letters):
            raise ValueError("a dead letter needs its error record")
        self._refuse_recorded(job_id, [d.task_id for d in letters])
        if not letters:
            return
        payloads = self._write_tmp(segments.encode([(d.task_id, d.payload) for d in letters]))
        try:
            errors = self._write_tmp(segments.encode([(d.task_id, d.error or b"") for d in letters]))
        except BaseException:
            os.unlink(payloads)
            raise
        seg = os.urandom(8).hex()
        linked: list[str] = []
        try:
            for k, d in enumerate(letters):
                linked.append(self._link_done(errors, job_id, d.task_id))
                letter = self._path("dead", f"{d.attempts}.{job_id}.{seg}.{k}")
                os.link(payloads, letter)
                linked.append(letter)
        except BaseException:
            _unlink_all(linked)  # a full disk part-way: none of the batch, as for a refused one
            raise
        finally:
            os.unlink(payloads)
            os.unlink(errors)
        self._bump(job_id, inserted=len(letters), dead=len(letters))
        self._flush()
