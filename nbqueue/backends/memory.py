"""mem:// — the storage contract in process memory, for tests and in-process queues.

Every ``mem://NAME`` opened in one process is the same store, so a producer and worker threads
share it. Nothing survives the process.
"""

from __future__ import annotations

import functools
import heapq
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence

from ..ids import check_batch, check_id, check_tasks_of, check_worker_id, job_of
from .base import (
    Backend,
    CommitWatch,
    Counts,
    DeadLetter,
    Lease,
    TaskInfo,
    TaskStatus,
    identity_changed,
)

_stores: dict[str, MemoryBackend] = {}
_stores_lock = threading.Lock()


def open_memory(name: str) -> MemoryBackend:
    """The process-wide store called ``name``, created on first use."""
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            store = _stores[name] = MemoryBackend(name)
        return store


class _ReadyTasks:
    """Ready task ids by job. Jobs are served highest priority first and, within a priority, in
    turn: each take starts with the job that waited longest, so a small job behind a big one
    starts at once (see ``Backend.lease``)."""

    def __init__(self) -> None:
        self._by_job: dict[str, deque[str]] = {}
        self._turns: dict[int, OrderedDict[str, None]] = {}  # priority -> jobs, next first
        self.priority: dict[str, int] = {}  # job -> its priority (0 unless inserted with one)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, task_id: str) -> None:
        job = job_of(task_id)
        tasks = self._by_job.get(job)
        if tasks is None:
            tasks = self._by_job[job] = deque()
            self._turns.setdefault(self.priority.get(job, 0), OrderedDict())[job] = None
        tasks.append(task_id)
        self._count += 1

    def take(self, n: int) -> list[str]:
        """Up to ``n`` ids: from the job whose turn it is, then the next, until ``n``."""
        out: list[str] = []
        while len(out) < n and self._turns:
            level = max(self._turns)
            jobs = self._turns[level]
            job = next(iter(jobs))
            tasks = self._by_job[job]
            while tasks and len(out) < n:
                out.append(tasks.popleft())
            if tasks:
                jobs.move_to_end(job)  # its turn is over
            else:
                del jobs[job], self._by_job[job]
                if not jobs:
                    del self._turns[level]
        self._count -= len(out)
        return out

    def discard(self, job: str, task_ids: set[str]) -> None:
        """Take these ids of ``job`` out (cancelled while they waited)."""
        tasks = self._by_job.get(job)
        if not tasks:
            return
        kept = deque(t for t in tasks if t not in task_ids)
        self._count -= len(tasks) - len(kept)
        if kept:
            self._by_job[job] = kept
            return
        del self._by_job[job]
        for level, jobs in list(self._turns.items()):
            if job in jobs:
                del jobs[job]
                if not jobs:
                    del self._turns[level]

    def __iter__(self) -> Iterator[str]:
        """Every id, in the order takes would hand them out if no job had more than one."""
        for level in sorted(self._turns, reverse=True):
            for job in self._turns[level]:
                yield from self._by_job[job]


class _MemoryWatch(CommitWatch):
    def __init__(self, backend: MemoryBackend, job_id: str) -> None:
        self.backend, self.job_id, self.read_record = backend, job_id, backend.record
        self.read_counts = functools.partial(backend.job_counts, job_id)
        self.seen = 0  # commits from before the watch began wake the first wait

    def wait(self, timeout: float) -> bool:
        length = self.backend.wait_for_commits(self.job_id, self.seen, timeout)
        moved, self.seen = length > self.seen, length
        return moved


class MemoryBackend(Backend):
    """A thread-safe in-memory queue. Use ``open_memory`` to share one by name."""

    blocking_lease = True
    counts_exact = True

    def __init__(self, name: str = "default") -> None:
        self.url = f"mem://{name}"
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        self._queue_id = uuid.uuid4().hex
        self._functions: dict[str, bytes] = {}
        self._jobs: dict[str, bytes] = {}
        self._payloads: dict[str, bytes] = {}
        self._attempts: dict[str, int] = {}
        self._ready = _ReadyTasks()
        self._delayed: list[tuple[float, str]] = []  # (ready_at, task_id)
        self._leases: dict[str, tuple[str, float]] = {}  # task_id -> (token, deadline)
        self._suspects: set[str] = set()  # tasks a lease of which expired (Lease.suspect)
        self._results: dict[str, dict[str, bytes]] = {}
        self._logs: dict[str, list[str]] = {}  # job id -> task ids in commit order
        self._dead: dict[str, DeadLetter] = {}
        self._counts = Counts()
        self._job_counts: dict[str, Counts] = {}
        self._workers: dict[str, tuple[bytes, float]] = {}  # worker id -> (info, expires)
        self._job_workers: dict[str, set[str]] = {}  # job id -> ids of the workers that ran its tasks
        # Cancel marks: job id -> record (the whole job), task id -> record (that task).
        self._cancelled_jobs: dict[str, bytes] = {}
        self._cancelled_tasks: dict[str, bytes] = {}
        self._cancelled_payloads: dict[str, bytes] = {}  # kept so that retry can run them again

    # -- helpers --------------------------------------------------------------------------------
    def _bump(self, job_id: str, **delta: int) -> None:
        jc = self._job_counts.setdefault(job_id, Counts())
        for name, d in delta.items():
            setattr(self._counts, name, getattr(self._counts, name) + d)
            setattr(jc, name, getattr(jc, name) + d)

    def _current(self, task_id: str, token: str) -> bool:
        held = self._leases.get(task_id)
        return held is not None and held[0] == token and held[1] > time.monotonic()

    def _requeue(self, task_id: str, delay: float = 0.0) -> None:
        if delay > 0:
            heapq.heappush(self._delayed, (time.monotonic() + delay, task_id))
        else:
            self._ready.append(task_id)
        self._cond.notify_all()

    def _cancel_record(self, task_id: str) -> bytes | None:
        """The record a marked task ends with, or None when it is not marked."""
        record = self._cancelled_tasks.get(task_id)
        return self._cancelled_jobs.get(job_of(task_id)) if record is None else record

    def _end_cancelled(self, task_id: str, record: bytes, was: str) -> None:
        """End a task ``was`` queued or leased as cancelled, with ``record`` as its record."""
        self._cancelled_payloads[task_id] = self._payloads.pop(task_id)
        del self._attempts[task_id]
        self._suspects.discard(task_id)
        self._put_record(task_id, record)
        self._bump(job_of(task_id), **{was: -1}, cancelled=1)
        self._cond.notify_all()

    def _put_record(self, task_id: str, record: bytes) -> None:
        """Commit a task's record: its job's results and commit log (the caller notifies)."""
        job_id = job_of(task_id)
        self._results.setdefault(job_id, {})[task_id] = record
        self._logs.setdefault(job_id, []).append(task_id)

    def _back_from_lease(self, task_id: str) -> bool:
        """A lease that ended without a result: a marked task ends cancelled (True); any other
        is queued again by the caller (False)."""
        record = self._cancel_record(task_id)
        if record is None:
            return False
        self._end_cancelled(task_id, record, "leased")
        return True

    def _reclaim_expired(self, force: bool = False) -> int:
        now = time.monotonic()
        expired = [t for t, (_, deadline) in self._leases.items() if force or deadline <= now]
        for task_id in expired:
            if self._leases[task_id][1] > now:  # a live lease taken back by force: a release
                self._attempts[task_id] -= 1
            else:
                self._suspects.add(task_id)
            del self._leases[task_id]
            if self._back_from_lease(task_id):
                continue
            self._bump(job_of(task_id), leased=-1, queued=1)
            self._ready.append(task_id)
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[1])
        return len(expired)

    # -- functions and jobs ---------------------------------------------------------------------
    def put_function(self, digest: str, blob: bytes) -> None:
        with self._cond:
            self._functions.setdefault(digest, bytes(blob))

    def get_function(self, digest: str) -> bytes:
        with self._cond:
            return self._functions[digest]

    def put_job(self, job_id: str, meta: bytes) -> None:
        check_id(job_id, "job id")
        with self._cond:
            self._jobs[job_id] = bytes(meta)

    def get_job(self, job_id: str) -> bytes | None:
        with self._cond:
            return self._jobs.get(job_id)

    def list_jobs(self) -> list[str]:
        with self._cond:
            return list(self._jobs)

    # -- tasks ----------------------------------------------------------------------------------
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
        with self._cond:
            if queue_id is not None and queue_id != self._queue_id:
                raise identity_changed(queue_id, self._queue_id)
            if priority:
                self._ready.priority.setdefault(job_id, int(priority))
            for task_id, _ in tasks:
                if task_id in self._payloads:
                    raise ValueError(f"task {task_id!r} already exists")
            for task_id, payload in tasks:
                self._payloads[task_id] = bytes(payload)
                self._attempts[task_id] = 0
                self._requeue(task_id, delay)
            self._bump(job_id, inserted=len(tasks), queued=len(tasks))
            if record is not None:
                self._jobs[job_id] = bytes(record)
            self._cond.notify_all()

    def lease(self, n: int, seconds: float, wait: float = 0.0) -> list[Lease]:
        end = time.monotonic() + wait
        with self._cond:
            while True:
                self._reclaim_expired()
                if self._ready or wait <= 0 or time.monotonic() >= end:
                    break
                timeout = end - time.monotonic()
                if self._delayed:
                    timeout = min(timeout, self._delayed[0][0] - time.monotonic())
                if self._leases:
                    timeout = min(timeout, min(d for _, d in self._leases.values()) - time.monotonic())
                self._cond.wait(max(timeout, 0.001))
            leases: list[Lease] = []
            deadline = time.monotonic() + seconds
            while self._ready and len(leases) < n:
                for task_id in self._ready.take(n - len(leases)):
                    if task_id not in self._payloads:  # purged, dead or cancelled meanwhile
                        continue
                    record = self._cancel_record(task_id)
                    if record is not None:  # never handed out: it ends here
                        self._end_cancelled(task_id, record, "queued")
                        continue
                    self._attempts[task_id] += 1
                    token = os.urandom(8).hex()
                    self._leases[task_id] = (token, deadline)
                    self._bump(job_of(task_id), queued=-1, leased=1)
                    attempt, suspect = self._attempts[task_id], task_id in self._suspects
                    leases.append(Lease(task_id, token, attempt, self._payloads[task_id], suspect))
            return leases

    def renew(self, task_id: str, token: str, seconds: float) -> bool:
        with self._cond:
            if not self._current(task_id, token):
                return False
            self._leases[task_id] = (token, time.monotonic() + seconds)
            return True

    def complete(self, items: Sequence[tuple[str, str, bytes]]) -> list[bool]:
        out = []
        with self._cond:
            for task_id, token, result in items:
                if not self._current(task_id, token):
                    out.append(False)
                    continue
                del self._leases[task_id]
                del self._payloads[task_id]
                del self._attempts[task_id]
                self._suspects.discard(task_id)
                self._put_record(task_id, bytes(result))
                self._bump(job_of(task_id), leased=-1, completed=1)
                out.append(True)
            self._cond.notify_all()
        return out

    def fail(self, task_id: str, token: str, error: bytes, retry_in: float | None) -> TaskStatus | None:
        with self._cond:
            if not self._current(task_id, token):
                return None
            del self._leases[task_id]
            if self._back_from_lease(task_id):
                return TaskStatus.CANCELLED
            job_id = job_of(task_id)
            if retry_in is not None:
                self._bump(job_id, leased=-1, failed=1, queued=1)
                self._requeue(task_id, retry_in)
                return TaskStatus.QUEUED
            self._dead[task_id] = DeadLetter(
                task_id, self._attempts.pop(task_id), self._payloads.pop(task_id), bytes(error)
            )
            self._suspects.discard(task_id)
            self._put_record(task_id, bytes(error))
            self._bump(job_id, leased=-1, failed=1, dead=1)
            self._cond.notify_all()
            return TaskStatus.DEAD

    def release(self, task_id: str, token: str) -> bool:
        with self._cond:
            if not self._current(task_id, token):
                return False
            del self._leases[task_id]
            self._attempts[task_id] -= 1
            if not self._back_from_lease(task_id):
                self._bump(job_of(task_id), leased=-1, queued=1)
                self._requeue(task_id)
            return True

    # -- cancelling -----------------------------------------------------------------------------
    def cancel(self, job_id: str, record: bytes, task_ids: Sequence[str] | None = None) -> int:
        check_id(job_id, "job id")
        with self._cond:
            if task_ids is None:
                self._cancelled_jobs[job_id] = bytes(record)
                chosen = [t for t in self._payloads if job_of(t) == job_id]
            else:
                chosen = []
                for task_id in check_tasks_of(job_id, task_ids):
                    self._cancelled_tasks[task_id] = bytes(record)
                    if task_id in self._payloads:
                        chosen.append(task_id)
            ended = {t for t in chosen if t not in self._leases}  # leased: marked, ends later
            for task_id in ended:
                self._end_cancelled(task_id, bytes(record), "queued")
            self._ready.discard(job_id, ended)
            if any(t in ended for _, t in self._delayed):
                self._delayed = [item for item in self._delayed if item[1] not in ended]
                heapq.heapify(self._delayed)
            return len(ended)

    def cancel_requested(self, task_ids: Sequence[str]) -> set[str]:
        with self._cond:
            return {t for t in task_ids if self._cancel_record(t) is not None}

    # -- running failed tasks again -------------------------------------------------------------
    def failed_payloads(self, job_id: str) -> dict[str, bytes]:
        with self._cond:
            found = {t: letter.payload for t, letter in self._dead.items() if job_of(t) == job_id}
            found.update((t, p) for t, p in self._cancelled_payloads.items() if job_of(t) == job_id)
            return found

    def retry(self, job_id: str, tasks: Sequence[tuple[str, bytes]]) -> int:
        check_batch(job_id, tasks)
        with self._cond:
            for task_id, _ in tasks:
                if task_id not in self._dead and task_id not in self._cancelled_payloads:
                    raise ValueError(f"task {task_id!r} did not end dead or cancelled: it cannot be retried")
            self._cancelled_jobs.pop(job_id, None)
            for task_id, payload in tasks:
                if self._dead.pop(task_id, None) is not None:
                    self._bump(job_id, dead=-1, queued=1)
                else:
                    del self._cancelled_payloads[task_id]
                    self._bump(job_id, cancelled=-1, queued=1)
                self._cancelled_tasks.pop(task_id, None)
                self._results.get(job_id, {}).pop(task_id, None)
                self._payloads[task_id] = bytes(payload)
                self._attempts[task_id] = 0
                self._suspects.discard(task_id)
                self._requeue(task_id)
            return len(tasks)

    # -- reads ----------------------------------------------------------------------------------
    def counts(self) -> Counts:
        with self._cond:
            return self._with_scheduled(Counts(**self._counts.as_dict()), None)

    def job_counts(self, job_id: str) -> Counts:
        with self._cond:
            return self._with_scheduled(Counts(**self._job_counts.get(job_id, Counts()).as_dict()), job_id)

    def _with_scheduled(self, counts: Counts, job: str | None) -> Counts:
        """Move the tasks not ready yet (of ``job``) from ``queued`` to ``scheduled``."""
        now = time.monotonic()
        waiting = [
            t
            for at, t in self._delayed
            if at > now and t in self._payloads and (job is None or job_of(t) == job)
        ]
        counts.scheduled = min(len(waiting), counts.queued)
        counts.queued -= counts.scheduled
        return counts

    def results(self, job_id: str) -> dict[str, bytes]:
        with self._cond:
            return dict(self._results.get(job_id, {}))

    # -- watching -------------------------------------------------------------------------------
    def watch_commits(self, job_id: str) -> CommitWatch:
        return _MemoryWatch(self, job_id)

    def wait_for_commits(self, job_id: str, seen: int, timeout: float) -> int:
        """Block until the job's commit log is longer than ``seen`` or ``timeout`` passes; its
        length then."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._logs.get(job_id, ())) > seen, max(timeout, 0.0))
            return len(self._logs.get(job_id, ()))

    def read_commits(
        self, job_id: str, cursor: object | None, limit: int
    ) -> tuple[list[tuple[str, bytes]], object]:
        start = 0 if cursor is None else cursor
        assert isinstance(start, int), "a cursor of this backend"
        with self._cond:
            ids = self._logs.get(job_id, [])[start : start + limit]
            done = self._results.get(job_id, {})
            # A task run again (retry) whose new record has not landed yet has none: skipped.
            return [(t, done[t]) for t in ids if t in done], start + len(ids)

    def record(self, task_id: str) -> bytes | None:
        with self._cond:
            return self._results.get(job_of(task_id), {}).get(task_id)

    # -- admin ----------------------------------------------------------------------------------
    def release_all(self, force: bool = False) -> int:
        with self._cond:
            moved = self._reclaim_expired(force=force)
            self._cond.notify_all()
            return moved

    def purge(self) -> None:
        with self._cond:
            self._reset()

    def queue_id(self) -> str:
        return self._queue_id

    def rezero(self) -> Counts:
        with self._cond:
            self._reclaim_expired()
            self._counts.inserted = self._counts.failed = 0
            for jc in self._job_counts.values():
                jc.inserted = jc.failed = 0
            return self._with_scheduled(Counts(**self._counts.as_dict()), None)

    def dead(self) -> list[DeadLetter]:
        with self._cond:
            return list(self._dead.values())

    def redrive(self, task_ids: Sequence[str] | None = None) -> int:
        with self._cond:
            chosen = (
                list(self._dead)
                if task_ids is None
                else [t for t in dict.fromkeys(task_ids) if t in self._dead]
            )
            for task_id in chosen:
                letter = self._dead.pop(task_id)
                job_id = job_of(task_id)
                self._results.get(job_id, {}).pop(task_id, None)
                self._payloads[task_id] = letter.payload
                self._attempts[task_id] = 0
                self._bump(job_id, dead=-1, queued=1)
                self._requeue(task_id)
            return len(chosen)

    def purge_dead(self, task_ids: Sequence[str] | None = None) -> int:
        with self._cond:
            chosen = (
                list(self._dead)
                if task_ids is None
                else [t for t in dict.fromkeys(task_ids) if t in self._dead]
            )
            for task_id in chosen:
                del self._dead[task_id]
                # The job keeps counting it as dead: its error record stays with the job.
                self._counts.dead -= 1
            return len(chosen)

    # -- inspection -----------------------------------------------------------------------------
    def peek_queued(self, n: int) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        with self._cond:
            for task_id in self._ready:
                if len(out) >= n:
                    break
                if task_id in self._payloads:  # purged or dead ids linger here
                    out.append((task_id, self._payloads[task_id]))
        return out

    def lease_deadlines(self, limit: int) -> list[tuple[str, float]]:
        with self._cond:
            now = time.monotonic()
            soonest = heapq.nsmallest(limit, self._leases.items(), key=lambda item: item[1][1])
            return [(task_id, deadline - now) for task_id, (_, deadline) in soonest]

    def find_task(self, task_id: str) -> TaskInfo | None:
        with self._cond:
            letter = self._dead.get(task_id)
            if letter is not None:
                return TaskInfo(task_id, TaskStatus.DEAD, letter.attempts, letter.payload)
            held = self._leases.get(task_id)
            if held is not None:
                attempts, payload = self._attempts[task_id], self._payloads[task_id]
                return TaskInfo(task_id, TaskStatus.LEASED, attempts, payload, held[1] - time.monotonic())
            if task_id in self._payloads:
                return TaskInfo(task_id, TaskStatus.QUEUED, self._attempts[task_id], self._payloads[task_id])
            record = self._results.get(job_of(task_id), {}).get(task_id)
            if record is not None:
                cancelled = record == self._cancel_record(task_id)
                return TaskInfo(task_id, TaskStatus.CANCELLED if cancelled else TaskStatus.COMPLETED, 0, None)
            return None

    # -- workers --------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, info: bytes, ttl: float) -> None:
        check_worker_id(worker_id)
        with self._cond:
            if ttl <= 0:
                self._workers.pop(worker_id, None)
            else:
                self._workers[worker_id] = (bytes(info), time.monotonic() + ttl)

    def workers(self) -> dict[str, bytes]:
        with self._cond:
            now = time.monotonic()
            for worker_id in [w for w, (_, expires) in self._workers.items() if expires <= now]:
                del self._workers[worker_id]
            return {worker_id: info for worker_id, (info, _) in self._workers.items()}

    def add_job_worker(self, job_id: str, worker_id: str) -> None:
        check_worker_id(worker_id)
        with self._cond:
            self._job_workers.setdefault(check_id(job_id, "job id"), set()).add(worker_id)

    def job_workers(self, job_id: str) -> set[str]:
        with self._cond:
            return set(self._job_workers.get(job_id, ()))

    # -- copying between queues -----------------------------------------------------------------
    def iter_queued(self) -> Iterator[tuple[str, bytes]]:
        with self._cond:
            ids = list(self._ready) + [t for _, t in self._delayed]
            snapshot = [(t, self._payloads[t]) for t in ids if t in self._payloads]
        return iter(snapshot)

    def iter_leased(self) -> Iterator[tuple[str, bytes]]:
        with self._cond:
            snapshot = [(t, self._payloads[t]) for t in self._leases]
        return iter(snapshot)

    def iter_functions(self) -> Iterator[tuple[str, bytes]]:
        with self._cond:
            return iter(list(self._functions.items()))

    def _check_unrecorded(self, job_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        check_batch(job_id, items)
        done = self._results.get(job_id, {})
        for task_id, _ in items:
            if task_id in done:
                raise ValueError(f"task {task_id!r} already has a record")

    def put_results(self, job_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        with self._cond:
            self._check_unrecorded(job_id, items)
            for task_id, record in items:
                self._put_record(task_id, bytes(record))
            self._bump(job_id, inserted=len(items), completed=len(items))

    def put_dead(self, job_id: str, letters: Sequence[DeadLetter]) -> None:
        with self._cond:
            self._check_unrecorded(job_id, [(d.task_id, d.payload) for d in letters])
            errors = [d.error for d in letters]
            if any(e is None for e in errors):
                raise ValueError("a dead letter needs its error record")
            for d, error in zip(letters, errors, strict=True):
                assert error is not None  # checked above
                self._dead[d.task_id] = DeadLetter(d.task_id, d.attempts, bytes(d.payload), bytes(error))
                self._put_record(d.task_id, bytes(error))
            self._bump(job_id, inserted=len(letters), dead=len(letters))


def open_memory_url(url: str) -> MemoryBackend:
    """``mem://NAME`` → the shared store NAME (``mem://`` alone is ``default``)."""
    name = url.split("://", 1)[1].strip("/") or "default"
    return open_memory(name)
