"""Jobs: the tasks of one insert, read back as counts, results and errors; the job record
(``JobState``) and what a progress view shows of a job (``Job.snapshot``: rate, ETA, newest
error), computed here and drawn by ``progress``.

A job outlives the process that made it: ``TaskQueue.job(id)`` reattaches from anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from . import defaults, ids
from .backends.base import CommitWatch, Counts
from .errors import BackendUnavailable, BadSignature, DecodeError, QueueStateLost, TaskFailed
from .ids import IndexSet, check_tasks_of, in_job, index_of
from .procs import process_gone, worker_id
from .progress import JobBar, JobView, Snapshot, TaskProgress, describe, progress_mode, running_shown
from .records import TaskError, TaskRecord, dead_letter_record, open_record, record_header, seal_cancel_record
from .tasks import TaskCodec, open_task, to_call

if TYPE_CHECKING:
    from .connection import QueueConnection

#: Seconds of unchanged counters after which wait() confirms the end by an exact count.
_STALL_CHECK_SECONDS = 5.0
#: How long wait() gives counters that lag the records to catch up once the records say done.
_COUNTERS_SETTLE_SECONDS = 0.5
#: Unfinished tasks at or below which wait() counts the records (the counters may lag them).
_EXACT_NEAR_END = 64
#: The window over which a view's rate is measured.
_RATE_WINDOW_SECONDS = 10.0


class JobState(str, enum.Enum):
    """Where a job's insert is; the strings are the job record's ``state`` (a wire format)."""

    INSERTING = "inserting"  #: the producer is still queuing tasks
    INSERTED = "inserted"  #: every task is queued; ``total`` is final
    INSERT_FAILED = "insert_failed"  #: the insert stopped part-way; ``total`` is what was queued


class _Pending:
    """The placeholder ``Job.results(wait=False)`` puts where a task has not finished."""

    _instance: _Pending | None = None

    def __new__(cls) -> _Pending:  # one of it, also after unpickling
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PENDING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "PENDING"


#: Stands in, in ``Job.results(wait=False)``, for a task that has not finished.
PENDING = _Pending()
#: Records ``as_completed`` reads per call.
_READ_BATCH = 1000
#: The columns ``to_dataframe`` gives every row, after the task's arguments and value.
_TABLE_COLUMNS = ("status", "error", "error_message", "attempts", "worker", "started", "finished", "duration")


def _table_row(record: TaskRecord | None, params: dict[str, Any]) -> dict[str, Any]:
    """One row of ``Job.to_dataframe``: arguments, value (a dict spread into columns), then
    ``_TABLE_COLUMNS``; a name taken already gets a prefix (``param_``, ``value.``)."""
    row = {(f"param_{k}" if k in _TABLE_COLUMNS else k): v for k, v in params.items()}
    if record is None:
        row["status"] = "pending"
        return row
    if record.ok:
        value = record.value
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for k, v in value.items():
                row[f"value.{k}" if k in row or k in _TABLE_COLUMNS else k] = v
        else:
            row["value" if "value" not in row else "value.value"] = value
    error = record.error
    row["status"] = "completed" if record.ok else "cancelled" if record.cancelled else "failed"
    row["error"] = None if error is None else error.type
    row["error_message"] = None if error is None else error.message
    row["attempts"] = record.attempt if error is None else error.attempts
    row["worker"] = record.worker
    row["started"], row["finished"] = record.started, record.finished
    both = record.started is not None and record.finished is not None
    row["duration"] = record.finished - record.started if both else None  # type: ignore[operator]
    return row


def _typed_times(df: Any, pd: Any) -> Any:
    """``to_dataframe``'s columns in order (arguments and value first) and its times as UTC
    timestamps."""
    fixed = [c for c in _TABLE_COLUMNS if c in df.columns]
    df = df[[c for c in df.columns if c not in fixed] + fixed]
    for column in ("started", "finished"):
        if column in df.columns:
            df[column] = pd.to_datetime(df[column], unit="s", utc=True)
    return df


def new_job_record(job_id: str, name: str | None, source: str | None) -> dict[str, Any]:
    """A fresh job record (JSON keys are a wire format: never renamed)."""
    return {
        "id": job_id,
        "name": name or job_id,
        "created": time.time(),
        "total": None,
        "state": JobState.INSERTING.value,
        "error": None,
        "source": source,
        "producer": {"host": socket.gethostname(), "pid": os.getpid()},
    }


def save_job_record(queue: QueueConnection, job_id: str, record: dict[str, Any]) -> None:
    """Write a job's record (replacing the one stored)."""
    queue.backend.put_job(job_id, json.dumps(record).encode())


class CommitWaiter:
    """Waits between looks at a job: until one of its tasks commits (woken by the storage: see
    ``Backend.watch_commits``) or the pause ends. While commits keep coming (a busy job) it looks
    at most every ``WAIT_POLL_MIN``, so a waiter costs the drain nothing; the first commit after
    a quiet spell wakes it at once, so one task's round trip is the storage's, not a timer's."""

    def __init__(self, watch: CommitWatch) -> None:
        self.watch = watch
        self._woken = -1.0  # when the last commit woke it (monotonic)

    def wait(self, pause: float) -> bool:
        """Block until a commit or ``pause`` seconds; True if a commit (or maybe one) woke it."""
        self._pace()
        if self.watch.wait(pause):
            self._woken = time.monotonic()
            return True
        return False

    def wait_then_read(self, task_id: str, pause: float) -> bytes | None:
        """``wait(pause)``, then the task's record if it has one (``CommitWatch.wait_then_read``)."""
        self._pace()
        woke, found = self.watch.wait_then_read(task_id, pause)
        if woke:
            self._woken = time.monotonic()
        return found

    def wait_then_counts(self, pause: float) -> Counts | None:
        """``wait(pause)``, then the job's counters (``CommitWatch.wait_then_counts``); None when
        the storage could not be asked (the caller's own look then rides out the outage)."""
        self._pace()
        try:
            woke, counts = self.watch.wait_then_counts(pause)
        except BackendUnavailable:
            return None
        if woke:
            self._woken = time.monotonic()
        return counts

    def _pace(self) -> None:
        since = time.monotonic() - self._woken
        if since < defaults.WAIT_POLL_MIN:
            time.sleep(defaults.WAIT_POLL_MIN - since)

    def close(self) -> None:
        """Release the watch."""
        self.watch.close()

    def __enter__(self) -> CommitWaiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def running_by_worker(workers: dict[str, bytes]) -> dict[str, list[str]]:
    """``worker -> the task ids it runs now``, from heartbeats (an older worker's says nothing)."""
    out = {}
    for worker, info in workers.items():
        try:
            running = json.loads(info).get("running")
        except (ValueError, AttributeError):
            continue
        if isinstance(running, list):
            out[worker] = [task for task in running if isinstance(task, str)]
    return out


class _Tracker:
    """What a job's view shows, computed from its counters: the rate over the last
    ``_RATE_WINDOW_SECONDS``, the newest error (read at most every ``ERROR_REFRESH_SECONDS``, and
    only when failures grew), and the elapsed time frozen when the job ends."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._lock = threading.Lock()
        self._finished_at: float | None = None  # wall clock, when first seen finished
        self._samples: list[tuple[float, int]] = []  # (time, finished) for the rate
        self._error: TaskError | None = None
        self._error_checked = 0.0
        self._dead_seen = 0

    def snapshot(self) -> Snapshot:
        job = self.job
        counts = job.counts()
        total = job.total
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, counts.finished))
            self._samples = [s for s in self._samples if now - s[0] <= _RATE_WINDOW_SECONDS]
            first_t, first_n = self._samples[0]
            rate = (counts.finished - first_n) / (now - first_t) if now - first_t > 0.5 else None
            due = now - self._error_checked >= defaults.ERROR_REFRESH_SECONDS
            read_error = counts.dead > self._dead_seen and due
            if read_error:
                self._error_checked = now
                self._dead_seen = counts.dead
        if read_error:
            self._error = job.latest_error()
        infos = job.worker_infos()  # one read for the workers, what runs now and its progress
        workers = running = None
        if infos is not None:
            with contextlib.suppress(Exception):  # informative only: the next snapshot asks again
                workers = len(job.workers_ran(infos))
            running = running_shown(counts, job.running_now(infos))
        meta = job.meta  # one read (it re-reads the storage while the job is inserting)
        created = meta.get("created") or time.time()
        elapsed = (self._finished_at or time.time()) - created
        state = job.state
        insert_error = meta.get("error") if state is JobState.INSERT_FAILED else None
        snap = Snapshot(
            counts, total, state is JobState.INSERTING, elapsed, rate, workers, self._error, insert_error
        )
        snap.running_now = running
        # Tasks waiting to become ready are retries once no delay of the insert holds them back.
        snap.retrying = not meta.get("ready_at") or time.time() >= meta["ready_at"]
        if infos and counts.leased:
            snap.running = job.running_progress(infos)
        if snap.finished:
            if self._finished_at is None:
                self._finished_at = time.time()
                snap.elapsed = self._finished_at - created
            # A finished job's rate is its average, not a window that decays after the end.
            snap.rate = counts.finished / snap.elapsed if snap.elapsed > 0 else None
            if self._error is None and counts.dead:
                self._error = snap.error = job.latest_error()
        return snap


class Job:
    """The tasks of one ``insert()``: progress, results in insertion order, errors."""

    def __init__(
        self, queue: QueueConnection, job_id: str, meta: dict | None = None, *, queue_id: str | None = None
    ) -> None:
        self.queue = queue
        self.id = job_id
        self._meta = meta
        self._view: JobView | None = None
        self._tracker = _Tracker(self)
        # A wait saw every task finished: ``results()`` then reads the records first, and waits
        # only if they fall short (tasks run again since).
        self._seen_finished = False
        #: The queue's identity when this job was made or found (its tasks are signed for it);
        #: a new one means the queue no longer holds the job.
        self.queue_id = queue.queue_id if queue_id is None else queue_id
        #: A watch whose first wait for the job's first task went out with its insert (see
        #: ``Backend.primed_watch``): the ``TaskHandle`` of a submitted task takes it, or this
        #: job's own first wait.
        self.first_task_watch: CommitWatch | None = None

    def take_first_task_watch(self) -> CommitWatch | None:
        """``first_task_watch``, handed over (the caller closes it)."""
        watch, self.first_task_watch = self.first_task_watch, None
        return watch

    def _take_watch(self) -> CommitWatch:
        """The watch primed at insert (once: a one-task job's first wait is on its way), else a
        new one."""
        watch = self.take_first_task_watch()
        return watch if watch is not None else self.queue.backend.watch_commits(self.id)

    @classmethod
    def attach(cls, queue: QueueConnection, job_id: str, *, queue_id: str | None = None) -> Job:
        """The job ``job_id`` of ``queue``, from its stored record.

        Raises:
            KeyError: the queue has no such job.
        """
        raw = queue.backend.get_job(job_id)
        if raw is None:
            raise KeyError(f"no job {job_id!r} in {queue.url}")
        return cls(queue, job_id, json.loads(raw), queue_id=queue_id)

    # -- record -----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """The job record (re-read while the job is still being inserted)."""
        if self._meta is None or self._meta.get("state") == JobState.INSERTING:
            raw = self.queue.backend.get_job(self.id)
            if raw is not None:
                self._meta = json.loads(raw)
            elif self._meta is None:
                raise KeyError(f"no job {self.id!r} in {self.queue.url}")
        return self._meta

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.id

    @property
    def state(self) -> JobState:
        """Where the job's insert is (a record of unknown state reads as inserted)."""
        try:
            return JobState(self.meta.get("state"))
        except ValueError:
            return JobState.INSERTED

    @property
    def total(self) -> int | None:
        """Tasks in the job; None while an insert is still streaming them."""
        meta = self.meta
        if self.state is JobState.INSERTING:
            if process_gone(meta.get("producer")):
                return self.counts().inserted
            return None
        return meta.get("total")

    def counts(self) -> Counts:
        """The job's counters (O(1))."""
        return self.queue.backend.job_counts(self.id)

    def check_queue(self) -> None:
        """Raise QueueStateLost if the queue's storage no longer holds this job's state."""
        if self.queue.backend.queue_id() != self.queue_id:
            raise QueueStateLost(
                f"the queue's state vanished: {self.queue.url} no longer holds job {self.name} "
                "(its storage lost its data, e.g. a Redis server restarted without persistence, "
                "or the queue was purged); insert the job again"
            )

    def done(self) -> bool:
        """True when every task completed, is dead or was cancelled."""
        total = self.total
        return total is not None and self.counts().finished >= total

    # -- steering ---------------------------------------------------------------------------
    def cancel(self, task_ids: Iterable[str] | None = None) -> int:
        """Cancel the job, or only the tasks named, for good; returns how many ended at once.

        Tasks waiting in the queue end cancelled now and never start. A running task gets
        ``nbqueue.Cancelled`` raised inside it within about a second (``CANCEL_CHECK_SECONDS``);
        one that has not returned after ``CANCEL_GRACE_SECONDS`` (stuck in C code) has its worker
        process killed by the lease keeper and ends cancelled. A task that finishes first keeps
        its value. The cancel is kept in the queue's storage: workers on any machine obey it.
        """
        ids = None if task_ids is None else check_tasks_of(self.id, list(task_ids))
        what = "the job" if ids is None else f"{len(ids)} task(s)"
        message = f"{what} was cancelled from {worker_id()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        record = seal_cancel_record(self.queue.signer, self.id, message, worker_id())
        return self.queue.backend.cancel(self.id, record, ids)

    def retry(self, fn: Callable[..., Any] | None = None) -> int:
        """Run the job's failed tasks again (dead, or cancelled), in the same job: their results
        land in the same places, their attempts start afresh. Returns how many were queued.

        Args:
            fn: the fixed function: each task's original arguments are bound to it instead of
                the function it was queued with (``@queueable``; a notebook function travels
                by value as it is *now*, with the helpers it calls). None runs the same code
                again, as ``TaskQueue.redrive`` does for dead letters.

        Raises:
            BindError: a task's arguments do not fit ``fn``'s signature (nothing was queued).
            NotQueueableError: ``fn`` is not marked ``@queueable`` (nothing was queued).
            TypeError: ``fn`` was given for tasks that are objects with ``execute()``.
        """
        q = self.queue
        payloads = q.backend.failed_payloads(self.id)
        if fn is None:  # the same code: the signed tasks as they were queued
            return q.backend.retry(self.id, list(payloads.items())) if payloads else 0
        codec = TaskCodec(q.signer, q.serializer, q.queue_id)
        calls = []
        for task_id, payload in sorted(payloads.items(), key=lambda item: index_of(item[0])):
            call = codec.decode(task_id, payload, q.backend.get_function)  # signature checked first
            if call.fn is None:
                raise TypeError(f"task {task_id} is an object with execute(): it takes no new function")
            calls.append((task_id, to_call(functools.partial(fn, *call.args, **call.kwargs))))
        timeout = self.meta.get("timeout")
        tasks = []
        for task_id, call in calls:  # every call checked before anything is written
            digest = None
            if call.ref is None:
                digest, blob, new = codec.function_digest(fn)
                if new:
                    q.backend.put_function(digest, blob)
            tasks.append((task_id, codec.encode(task_id, self.id, call, digest, timeout)))
        return q.backend.retry(self.id, tasks) if tasks else 0

    # -- display ----------------------------------------------------------------------------
    @property
    def view(self) -> JobView:
        """The job's progress view (one per Job object)."""
        if self._view is None:
            self._view = JobView(self)
        return self._view

    def snapshot(self) -> Snapshot:
        """What a progress view shows now: counts, total, rate, ETA, workers, newest error."""
        return self._tracker.snapshot()

    def latest_error(self) -> TaskError | None:
        """The most recently failed task's error, from the dead letters (not a scan of results)."""
        letters = [letter for letter in self.queue.backend.dead() if in_job(letter.task_id, self.id)]
        records = [dead_letter_record(self.queue.signer, letter) for letter in letters]
        newest = max(records, key=lambda r: r.finished or 0.0, default=None)
        return None if newest is None else newest.error

    def worker_infos(self) -> dict[str, bytes] | None:
        """The heartbeats of the workers the queue has heard from recently (None when the
        storage cannot say now)."""
        try:
            return self.queue.backend.workers()
        except Exception:
            return None

    def workers_seen(self) -> int | None:
        """Workers the queue has heard from recently (None when the storage cannot say now)."""
        infos = self.worker_infos()
        return None if infos is None else len(infos)

    def workers_ran(self, workers: dict[str, bytes] | None = None) -> set[str]:
        """The workers that ran this job's tasks: those that committed one (kept with the job,
        after they exit) and those whose heartbeat says they run one now.

        Args:
            workers: ``Backend.workers()`` if already read.
        """
        ran = self.queue.backend.job_workers(self.id)
        return ran | {worker for worker, n in self._running_tasks(workers).items() if n}

    def running_now(self, workers: dict[str, bytes] | None = None) -> int:
        """This job's tasks executing now, as the workers' heartbeats last said (about once a
        second while it changes): never more than their slots, unlike ``counts().leased``, which
        also holds the tasks a worker leased ahead.

        Args:
            workers: ``Backend.workers()`` if already read.
        """
        return sum(self._running_tasks(workers).values())

    def _running_tasks(self, workers: dict[str, bytes] | None) -> dict[str, int]:
        """``worker -> how many of this job's tasks it runs now``, from heartbeats."""
        if workers is None:
            workers = self.queue.backend.workers()
        return {
            worker: sum(in_job(task, self.id) for task in tasks)
            for worker, tasks in running_by_worker(workers).items()
        }

    def running_progress(self, workers: dict[str, bytes] | None = None) -> list[TaskProgress]:
        """What the job's running tasks last reported (``current_task().progress``), the
        furthest behind first; as the workers' heartbeats carry it (about once a second).

        Args:
            workers: ``Backend.workers()`` if already read.
        """
        if workers is None:
            workers = self.queue.backend.workers()
        found = []
        for worker, info in workers.items():
            try:
                reported = json.loads(info).get("progress") or {}
                for task_id, (done, total, note, at) in reported.items():
                    if in_job(task_id, self.id):
                        found.append(TaskProgress(task_id, float(done), total, str(note), worker, float(at)))
            except (ValueError, TypeError, AttributeError):
                continue  # an older worker's heartbeat, or not JSON: nothing reported
        return sorted(found, key=lambda p: (1.0 if p.fraction is None else p.fraction, p.reported))

    def _ipython_display_(self) -> None:
        """In a notebook: the live widget (or its text where widgets are off)."""
        if progress_mode() == "widget":
            self.view.show()
        else:
            from IPython.display import display

            display({"text/plain": self.view.refresh_text()}, raw=True)

    # -- waiting ----------------------------------------------------------------------------
    def wait(
        self,
        timeout: float | None = None,
        progress: bool = True,
        check: Callable[[], None] | None = None,
        *,
        cancel_on_interrupt: bool = False,
    ) -> Job:
        """Block until every task is finished (completed, dead or cancelled), showing progress.

        Args:
            timeout: give up after this many seconds.
            progress: show the widget (in a notebook) or a text bar.
            check: called at every poll; raise from it to stop waiting (e.g. workers died).
            cancel_on_interrupt: an interrupt (Ctrl-C, the kernel's stop button) cancels the job;
                by default it only stops the waiting, and the job runs on.

        Rides out a storage outage of up to ``defaults.WAIT_OUTAGE_SECONDS`` (a server restart).

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            QueueStateLost: the queue lost this job's state (its tasks will never finish).
            BackendUnavailable: the storage stayed unreachable too long.
            KeyboardInterrupt: interrupted (after it printed what it did, or how to cancel).
        """
        try:
            return self._wait(timeout, progress, check)
        except KeyboardInterrupt:
            if cancel_on_interrupt:
                ended = self.cancel()
                print(
                    f"interrupted: cancelled job {self.name} ({ended:,} waiting task(s) ended; "
                    "running ones are told to stop)",
                    file=sys.stderr,
                )
            else:
                print(
                    f"stopped waiting; job {self.name} runs on. To cancel it: "
                    f"tq.cancel({self.id!r}) or %queue cancel {self.id}",
                    file=sys.stderr,
                )
            raise

    def _wait(self, timeout: float | None, progress: bool, check: Callable[[], None] | None) -> Job:
        if progress and progress_mode() == "widget":
            return self._wait_with_widget(timeout, check)
        bar = JobBar(self.total, f"job {self.name}", enabled=progress)
        # The watch starts before the first look, so a commit in between still wakes the wait.
        with CommitWaiter(self._take_watch()) as waiter:
            try:
                polls = self._waiting(timeout, bar, check)
                with contextlib.suppress(StopIteration):
                    pause = next(polls)
                    while True:
                        pause = polls.send(waiter.wait_then_counts(pause))
            finally:
                bar.close()
        return self

    async def wait_async(self, timeout: float | None = None, check: Callable[[], None] | None = None) -> Job:
        """``wait()`` for ``await`` (IPython and Jupyter run top-level ``await``): the event loop
        runs other work while this waits (in a thread) for the next commit. Draws no progress;
        the job's widget still updates."""
        bar = JobBar(self.total, f"job {self.name}", enabled=False)
        with CommitWaiter(self._take_watch()) as waiter:
            polls = self._waiting(timeout, bar, check)
            with contextlib.suppress(StopIteration):
                pause = next(polls)
                while True:
                    pause = polls.send(await asyncio.to_thread(waiter.wait_then_counts, pause))
        return self

    def _waiting(
        self, timeout: float | None, bar: JobBar, check: Callable[[], None] | None
    ) -> Generator[float, Counts | None, None]:
        """The polls of a wait: yields how long to pause before the next one and is sent the
        job's counters read right after that pause (or None: it reads them itself); ends when the
        job finished (see ``wait`` for what it raises)."""
        start = time.monotonic()
        sleep = defaults.WAIT_POLL_MIN
        last_finished, last_change, exact_due = -1, start, start
        last_identity_check, outage_since = start, None
        exact = self.queue.backend.counts_exact
        sent: Counts | None = None
        if self._meta is None or self._meta.get("total") != 0:
            # No look before the first pause: a watch's first wait ends at once if the job had
            # commits already, and the counters come with it (one round trip saved).
            sent = yield sleep
        while True:
            try:
                total = self.total
                counts = sent if sent is not None else self.counts()
                if time.monotonic() - last_identity_check > defaults.WAIT_IDENTITY_CHECK_SECONDS:
                    self.check_queue()
                    last_identity_check = time.monotonic()
                outage_since = None
            except BackendUnavailable:
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > defaults.WAIT_OUTAGE_SECONDS:
                    raise
                if timeout is not None and time.monotonic() - start > timeout:
                    raise
                sent = yield defaults.WAIT_POLL_MAX
                continue
            bar.show(counts, total)
            if check is not None:
                check()
            if counts.finished != last_finished:
                last_finished, last_change = counts.finished, time.monotonic()
                sleep = defaults.WAIT_POLL_MIN
            ended = total is not None and counts.finished >= total
            if ended and exact:
                self._seen_finished = True
                return
            # Counters lag the records (fq:// writes them after the commit that woke this wait)
            # and a killed process may never write them: the records themselves decide, when the
            # counters say the job ended, and near the end or when they stall. Counting the
            # records costs what it costs (a listing of a million results on fq://): those last
            # two look at most a tenth of the wait's time.
            near_or_stalled = (
                total is not None
                and time.monotonic() >= exact_due
                and (
                    total - counts.finished <= _EXACT_NEAR_END
                    or time.monotonic() - last_change > _STALL_CHECK_SECONDS
                )
            )
            if total is not None and not exact and (ended or near_or_stalled):
                counted = time.monotonic()
                if self.queue.backend.exact_job_finished(self.id) >= total:
                    bar.show(self._settled_counts(counts, total), total)
                    self._seen_finished = True
                    return
                exact_due = time.monotonic() + 10 * (time.monotonic() - counted)
                last_change = time.monotonic()
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"job {self.name} not finished after {timeout:g}s: {describe(counts, total)}"
                )
            sent = yield sleep
            sleep = min(sleep * 1.5, defaults.WAIT_POLL_MAX)

    def _settled_counts(self, counts: Counts, total: int) -> Counts:
        """The records say the job ended: give counters that lag them (fq:// writes a commit's
        counters just after it) a moment to land, so what a caller reads next (the last view
        drawn, ``done()``) says so too. A process killed in between never writes them; then
        the counters stay what they say."""
        deadline = time.monotonic() + _COUNTERS_SETTLE_SECONDS
        while counts.finished < total and time.monotonic() < deadline:
            time.sleep(0.001)
            counts = self.counts()
        return counts

    def _wait_with_widget(self, timeout: float | None, check: Callable[[], None] | None) -> Job:
        """Wait while redrawing the widget from this (the cell's) thread; end on the final state."""
        view = self.view
        if not view.shown:
            view.show()

        def poll() -> None:
            view.refresh()
            if check is not None:
                check()

        try:
            return self._wait(timeout, False, poll)
        finally:
            view.finish()

    # -- results ----------------------------------------------------------------------------
    def records(self) -> list[TaskRecord]:
        """Every committed record, in insertion order (unfinished tasks are absent)."""
        q = self.queue
        raw = q.backend.results(self.id)
        ordered = sorted(raw.items(), key=lambda item: index_of(item[0]))
        return [open_record(q.signer, q.serializer, task_id, blob, self.id) for task_id, blob in ordered]

    def as_completed(self, timeout: float | None = None) -> Iterator[TaskRecord]:
        """Each task's record as it commits (``.index``, ``.task_id``, ``.ok``, ``.value`` or
        ``.error``), until every task of the job finished.

        Reads only what is new each time (the job's commit log, from a cursor), wakes on the
        commits themselves, and holds memory flat however large the job (a bit per task to
        yield each task once: a task retried after it was yielded is not yielded again).

        Raises:
            TimeoutError: ``timeout`` seconds passed before the job finished.
            QueueStateLost: the queue lost this job's state.
        """
        q, backend = self.queue, self.queue.backend
        returned = IndexSet()
        count = 0
        cursor: object | None = None
        start = time.monotonic()
        last_identity_check = start
        with CommitWaiter(backend.watch_commits(self.id)) as waiter:
            while True:
                total = self.total  # read before the commits: a total reached is then final
                began = time.monotonic()
                while True:
                    items, cursor = backend.read_commits(self.id, cursor, _READ_BATCH)
                    for task_id, blob in items:
                        i = index_of(task_id)
                        if not returned.add(i):
                            continue
                        count += 1
                        yield open_record(q.signer, q.serializer, task_id, blob, self.id)
                    if len(items) < _READ_BATCH:
                        break
                if total is not None and count >= total:
                    self._settled_counts(self.counts(), total)  # done() agrees once this ends
                    return
                if total is not None and self.counts().finished >= total:
                    # Every task finished but the log did not show them all (a job inserted by an
                    # nbqueue without commit logs): the records themselves, once.
                    for record in self.records():
                        if returned.add(record.index):
                            count += 1
                            yield record
                    if count >= total:
                        return
                now = time.monotonic()
                if timeout is not None and now - start > timeout:
                    raise TimeoutError(f"job {self.name} not finished after {timeout:g}s")
                if now - last_identity_check > defaults.WAIT_IDENTITY_CHECK_SECONDS:
                    self.check_queue()
                    last_identity_check = now
                # Reading costs what it costs (an fq:// pass lists the job's done/ directory):
                # rest at least as long, so following a huge job takes at most half a core.
                time.sleep(min(now - began, defaults.WAIT_POLL_MAX))
                waiter.wait(defaults.WAIT_POLL_MAX)

    def results(
        self,
        on_error: Literal["raise", "none", "exception"] = "raise",
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[Any]:
        """Task values in insertion order.

        Args:
            on_error: ``"raise"`` raises TaskFailed if any task failed for good or was
                cancelled; ``"none"`` puts None in its place; ``"exception"`` puts its TaskError
                there.
            wait: wait for the job to finish first (quietly; ``wait()`` shows progress). With
                False, what is done now: ``nbqueue.PENDING`` stands in for each unfinished task.
            timeout: with ``wait``, give up after this many seconds.

        Raises:
            TaskFailed: tasks failed and ``on_error="raise"``.
            TimeoutError: ``timeout`` passed first.
        """
        # After a wait that saw the job end, its records are read once: a wait again only if
        # they fall short (tasks run again since, by retry()).
        total = self.total
        records = self.records() if self._seen_finished or not wait else []
        complete = self._seen_finished and total is not None and len(records) >= total
        if wait and not complete:
            if not self.done():
                self.wait(timeout=timeout, progress=False)
            records, total = self.records(), self.total
        errors = [r.error for r in records if not r.ok]
        if errors and on_error == "raise":
            raise TaskFailed(f"{len(errors)} of {total} tasks failed; first: {errors[0]}", errors)
        size = max([total or 0] + [r.index + 1 for r in records])
        out: list[Any] = [PENDING] * size
        for r in records:
            out[r.index] = r.value if r.ok else (r.error if on_error == "exception" else None)
        return out

    def to_dataframe(self, *, wait: bool = True, timeout: float | None = None) -> Any:
        """The job as a pandas DataFrame, one row per task (indexed by the task's place in the
        job): its plain-data arguments by parameter name, its value (a dict value spreads into
        columns), ``status``, ``error`` and ``error_message``, ``attempts``, ``worker``,
        ``started``, ``finished`` (UTC) and ``duration`` (seconds).

        Arguments are read from the signed records (or, for a task that never ran, its signed
        task): signatures are checked, and no function is loaded. Arguments that are not plain
        data (arrays, frames, objects) are not columns. With ``wait=False``, unfinished tasks
        are rows with status ``pending``.

        Raises:
            ImportError: pandas is not installed (``pip install 'nbqueue[table]'``).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Job.to_dataframe needs pandas: pip install 'nbqueue[table]'") from None
        if wait and not self.done():
            self.wait(timeout=timeout, progress=False)
        records = {r.index: r for r in self.records()}
        params = {i: r.params for i, r in records.items() if r.params}
        if any(not r.ok and not r.params for r in records.values()):
            params.update(self._params_of_failed())
        size = max([self.total or 0] + [i + 1 for i in records])
        return pd.DataFrame.from_records(
            [_table_row(records.get(i), params.get(i) or {}) for i in range(size)],
            index=pd.RangeIndex(size, name="task"),
        ).pipe(_typed_times, pd)

    def _params_of_failed(self) -> dict[int, dict[str, Any]]:
        """The arguments of dead and cancelled tasks, from their kept signed tasks (a task killed
        with its worker, or cancelled before it ran, has a record that does not carry them)."""
        out = {}
        for task_id, payload in self.queue.backend.failed_payloads(self.id).items():
            try:
                header, _ = open_task(self.queue.signer, task_id, payload)
            except (BadSignature, DecodeError):
                continue  # not signed by a key this process has: its arguments are not shown
            if isinstance(header.get("p"), dict):
                out[index_of(task_id)] = header["p"]
        return out

    def output(self, index: int) -> str | None:
        """What task ``index`` printed (stdout and stderr, interleaved as printed; the last
        ``OUTPUT_LIMIT`` characters) in the attempt that finished it; None while it has not.
        A failed task's output is on its error too (``errors()[k].output``)."""
        if not 0 <= index < (self.total if self.total is not None else index + 1):
            raise IndexError(f"job {self.id} has no task {index}")
        task = ids.task_id(self.id, index)
        blob = self.queue.backend.record(task)
        return None if blob is None else record_header(self.queue.signer, task, blob, self.id).output

    def errors(self) -> list[TaskError]:
        """The tasks that failed for good or were cancelled (type ``Cancelled``), with type,
        message, traceback and attempts."""
        return [r.error for r in self.records() if not r.ok and r.error is not None]

    def __repr__(self) -> str:
        return f"<Job {self.name} {describe(self.counts(), self.total)} on {self.queue.url}>"
