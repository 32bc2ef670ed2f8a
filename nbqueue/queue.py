"""``TaskQueue``: the one object a user holds. Opens a backend by URL and offers insert, workers,
jobs, status and the admin verbs; ``LocalTaskQueue`` runs tasks in local processes at once."""

from __future__ import annotations

import builtins
import contextlib
import datetime
import inspect
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import defaults
from .backends.base import Counts, DeadLetter, TaskStatus
from .connection import QueueConnection
from .errors import BadSignature, DecodeError, NotLeasedHere, QueueEmptyError, QueueURLError, TaskRefused
from .insert import insert_tasks
from .jobs import Job
from .procs import WorkerProcesses
from .tasks import TaskCodec, is_single_task, queue_id_of
from .worker import (
    HANDLED_SIGNALS,
    HeldTask,
    Worker,
    WorkerStats,
    complete_by_hand,
    lease_by_hand,
    readable_task,
    run_in_processes,
    worker_command,
    worker_env,
)

_last_used: str | None = None  # see last_used_url


def last_used_url() -> str | None:
    """The URL of the queue this process inserted into last (or a magic named last): where
    ``%queue workers start N`` and the other magics go without a URL."""
    return _last_used


#: Told each queue URL this process uses, once (``on_first_use``).
_first_use_listeners: list[Callable[[str], None]] = []
_used_urls: set[str] = set()


def on_first_use(listener: Callable[[str], None]) -> None:
    """Call ``listener(url)`` the first time this process uses a queue (inserts into it, starts
    workers on it, names it in a magic): how a kernel tells its Jupyter server which queues to
    show. ``url`` is the one another process opens the queue by (``worker_url``)."""
    _first_use_listeners.append(listener)


def note_used(url: str) -> None:
    """Record ``url`` as the queue this process used last (see ``last_used_url``)."""
    global _last_used
    _last_used = url
    if url in _used_urls:
        return
    _used_urls.add(url)
    for listener in list(_first_use_listeners):
        try:
            listener(url)
        except Exception as exc:  # a listener only informs: the use goes on
            logging.getLogger("nbqueue").debug("first-use listener failed for %s: %s", url, exc)


#: What ``poll(stop_fn=...)`` may ask for by parameter name (python-task-queue's names).
STOP_FN_ARGUMENTS = ("executed", "tries", "previous_execution_time", "elapsed_time")


class TaskQueue(QueueConnection):
    """A queue reached by URL: ``fq://PATH``, ``redis://host:port/db?queue=NAME``, ``mem://NAME``.

    Args:
        url: the queue; defaults to ``$NBQUEUE_URL``. A bare path means fq://.
        insecure: neither sign nor check signatures (only for queues no one else can write).
        serializer: name of the serializer for tasks and results.
        green: the default of ``insert(green=...)`` (python-task-queue puts it here).
        progress: the default of ``insert(progress=...)``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        insecure: bool = False,
        serializer: str = "dill",
        green: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(url, insecure=insecure, serializer=serializer)
        self.green = green
        self.progress = progress
        self._held: dict[str, HeldTask] = {}  # tasks this object leased by hand, by task id
        self._reader: TaskCodec | None = None

    # -- inserting ------------------------------------------------------------------------------
    def insert(
        self,
        tasks: Any,
        *,
        total: int | None = None,
        name: str | None = None,
        batch_size: int = defaults.INSERT_BATCH_SIZE,
        progress: bool | None = None,
        source: str | None = None,
        parallel: int | bool = 1,
        green: bool | None = None,
        explain: bool = False,
        delay: float | None = None,
        eta: datetime.datetime | None = None,
        delay_seconds: float | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> Job:
        """Queue every task of ``tasks`` as one job and return the Job.

        ``tasks`` may be any iterable (a generator streams in constant memory) of
        ``partial(fn, ...)`` of ``@queueable`` functions, bare queueable functions, or
        registered-task objects; or one such task; or another TaskQueue, whose tasks (queued or
        leased) are inserted here as one job, the source left as it is. Each task is checked
        (queueable, arguments fit the signature, serializable) as it is read; a bad one raises
        before its batch is written.

        Args:
            total: number of tasks, for the progress bar when ``tasks`` has no ``len()``.
            name: a name for the job (defaults to its id).
            batch_size: tasks per storage write.
            progress: show a bar counting uploaded tasks (default: the queue's ``progress``).
            source: text recorded with the job (e.g. a notebook cell).
            parallel: with an iterable that has ``len()`` and slice ``__getitem__`` (a range-like
                task iterator, a list), N spawned processes each build and upload one slice;
                the parent never reads the tasks. With a plain generator, this process encodes
                while N threads write batches through a bounded queue (storage round trips
                overlap the encoding; memory stays bounded). True means one per CPU.
            green: write batches from gevent greenlets, for network backends (default: the
                queue's ``green``). You must run ``from gevent import monkey; monkey.patch_all()``
                first; nbqueue never patches.
            explain: print one line per job function: what travels by value (with sizes) and
                what by reference (see ``nbqueue.explain``).
            delay: the tasks are queued now and become ready this many seconds later (the
                storage's clock decides: the server's, on redis://); until then they count as
                *scheduled*. ``delay_seconds`` is python-task-queue's name for it.
            eta: when the tasks become ready (a ``datetime``; naive means local time), instead
                of ``delay``. A time past means now.
            priority: workers serve jobs of a higher priority first; jobs of one priority take
                turns, so a small job inserted behind a big one starts at once (default 0).
            timeout: seconds each task may run (overrides ``@queueable(timeout=)``); past it
                the worker raises ``nbqueue.TaskTimeout`` inside the task, a failed attempt.
        """
        if isinstance(tasks, TaskQueue):
            if tasks.url == self.url:
                raise ValueError(f"{self.url} cannot be inserted into itself: its tasks would be doubled")
            total = tasks.enqueued if total is None else total
            tasks = tasks.tasks()
        elif is_single_task(tasks):
            tasks = [tasks]
        if parallel is True:
            parallel = os.cpu_count() or 1
        wait = _delay_of(delay, eta, delay_seconds)
        note_used(self.worker_url)
        return insert_tasks(
            self,
            tasks,
            total=total,
            name=name,
            batch_size=batch_size,
            progress=self.progress if progress is None else progress,
            source=source,
            parallel=int(parallel),
            green=self.green if green is None else green,
            explain=explain,
            delay=wait,
            priority=int(priority),
            timeout=timeout,
        )

    def insert_all(self, tasks: Any, **options: Any) -> Job:
        """``insert`` (python-task-queue's older name)."""
        return self.insert(tasks, **options)

    # -- jobs -----------------------------------------------------------------------------------
    def job(self, job_id: str, *, queue_id: str | None = None) -> Job:
        """Reattach to a job by id (from any process)."""
        return Job.attach(self, job_id, queue_id=queue_id)

    def cancel(self, job_id: str, task_ids: Sequence[str] | None = None) -> int:
        """Cancel a job, or only the tasks named, by id (see ``Job.cancel``); how many tasks
        ended at once.

        Raises:
            KeyError: the queue has no such job.
        """
        return self.job(job_id).cancel(task_ids)

    def jobs(self) -> list[Job]:
        """Every job of this queue, oldest first."""
        queue_id = self.queue_id  # once for all of them
        return [self.job(job_id, queue_id=queue_id) for job_id in self.backend.list_jobs()]

    # -- workers --------------------------------------------------------------------------------
    def poll(
        self,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
        verbose: bool = False,
        stop_fn: Callable[..., bool] | None = None,
        tally: bool = True,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        burst: bool = False,
        max_tasks: int | None = None,
        stop_event: threading.Event | None = None,
        only_by_reference: bool = False,
        concurrency: int = 1,
        echo_output: bool = True,
    ) -> WorkerStats:
        """Run tasks in this process, as a worker does, until told to stop; returns what it did.

        As in python-task-queue it polls until ``stop_fn`` says stop (forever without one);
        ``burst=True`` returns once nothing is queued or leased (drain the queue here), and
        ``max_tasks`` after that many tasks.

        Args:
            stop_fn: asked after every task and every lease that found nothing; True stops. It
                may take any of ``executed`` (tasks run), ``tries`` (leases in a row that found
                nothing), ``previous_execution_time`` and ``elapsed_time`` (seconds), by name.
            verbose: print one line per task run (the worker's log at INFO) to stdout.
            tally: accepted for python-task-queue: nbqueue always counts completions.
            stop_event: set it (from another thread) to stop after the running task. From the
                main thread, a first Ctrl-C does that too; a second interrupts the task.
            only_by_reference: refuse every task that ships pickled code, unread (it goes to
                the dead letters); only tasks by reference run.
            concurrency: ``async def`` tasks run at once on this worker's event loop.
            echo_output: what tasks print also shows here, as in python-task-queue (this is
                the caller's own process); it is kept with each task's record either way.
        """
        del tally  # every completion is counted: there is nothing to switch on
        worker = Worker(
            self,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            burst=burst,
            max_tasks=max_tasks,
            only_by_reference=only_by_reference,
            concurrency=concurrency,
            echo_output=echo_output,
        )
        if stop_fn is not None:
            worker.stop_when = _stop_asker(stop_fn, worker)
        if stop_event is not None:
            worker.stop_event = stop_event
        with _printing_worker_log(verbose), _interrupts_stop(worker):
            return worker.run()

    def spawn_workers(
        self,
        n: int = 1,
        *,
        lease_seconds: float | None = None,
        max_attempts: int | None = None,
        burst: bool = False,
        idle_exit: float | None = 300.0,
        only_by_reference: bool = False,
        concurrency: int = 1,
        task_timeout: float | None = None,
    ) -> WorkerProcesses:
        """Start ``n`` worker processes on this queue (fresh interpreters, not forks of the kernel).

        They keep running if the kernel restarts; they exit after ``idle_exit`` idle seconds, when
        the queue is empty with ``burst``, or on ``.stop()``; one killed (its lease keeper's kill
        of a stuck task, the OOM killer) is replaced while this process lives. With ``only_by_reference`` they
        refuse every task that ships pickled code. Each runs up to ``concurrency`` ``async def``
        tasks at once on its event loop. ``task_timeout`` limits the tasks whose job and function
        set no limit of their own.
        """
        if self.url.startswith("mem://"):
            raise QueueURLError("mem:// lives in this process only: use poll(), LocalTaskQueue, or fq://")
        note_used(self.worker_url)
        cmd = worker_command(
            lease_seconds=lease_seconds,
            burst=burst,
            max_attempts=max_attempts,
            idle_exit=idle_exit,
            insecure=self.insecure,
            only_by_reference=only_by_reference,
            concurrency=concurrency,
            task_timeout=task_timeout,
        )
        pool = WorkerProcesses(cmd, n, restart=True, env=worker_env(self.worker_url))
        pool.keep_alive()
        return pool

    # -- status and admin -----------------------------------------------------------------------
    def status(self) -> Counts:
        """inserted / queued / leased / completed / failed / dead, read in O(1)."""
        return self.backend.counts()

    @property
    def inserted(self) -> int:
        return self.status().inserted

    @property
    def enqueued(self) -> int:
        """Tasks still in the queue, leased or not (python-task-queue's meaning): ``while
        tq.enqueued > 0`` waits for running and scheduled tasks too. ``status().queued`` counts
        only those ready for a worker."""
        counts = self.status()
        return counts.waiting + counts.leased

    @property
    def leased(self) -> int:
        return self.status().leased

    @property
    def completed(self) -> int:
        return self.status().completed

    def is_empty(self) -> bool:
        """True when no task is queued or leased."""
        return self.enqueued == 0

    def block_until_empty(self, interval_sec: float = 2.0) -> None:
        """Wait until no task is queued or leased, checking every ``interval_sec`` seconds."""
        while self.enqueued > 0:
            time.sleep(interval_sec)

    def release_all(self) -> int:
        """Return every lease to the queue at once, running tasks' included (python-task-queue's
        meaning), uncharged: for leases held by workers you know are gone. Their tasks run again,
        and a late result of the old lease is refused. ``release_expired()`` is the safe verb."""
        return self.backend.release_all(force=True)

    def release_expired(self) -> int:
        """Return expired leases to the queue (what workers do on their own, now)."""
        return self.backend.release_all(force=False)

    # -- leasing by hand (python-task-queue's lease / delete / renew) ---------------------------
    def _codec(self) -> TaskCodec:
        if self._reader is None:
            self._reader = TaskCodec(
                self.signer, self.serializer, self.queue_id, refresh_queue_id=lambda: self.queue_id
            )
        return self._reader

    def lease(self, seconds: float = 600, num_tasks: int = 1, wait_sec: float | None = None) -> Any:
        """Lease tasks for this code to run itself: one task (``num_tasks=1``) or a list.

        Each is a ``FunctionTask`` (``task.execute()`` runs the call) or the task object itself,
        with its queue id in ``.id``. Run it, then ``delete(task)`` to commit it as completed
        (with the value a FunctionTask returned) before the lease ends, or ``renew(task,
        seconds)``. A task not deleted in time goes back to the queue and runs again. Signatures
        are verified before anything is loaded; a task that fails them goes to the dead letters.

        Raises:
            QueueEmptyError: no task was ready (within ``wait_sec`` seconds).
        """
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be > 0, not {num_tasks}")
        if seconds < 0:
            raise ValueError(f"lease seconds must be >= 0, not {seconds}")
        held = lease_by_hand(self, self._codec(), num_tasks, seconds, wait_sec or 0.0)
        if not held:
            raise QueueEmptyError(f"no task is ready in {self.url}")
        for item in held:
            self._held[item.lease.task_id] = item
        tasks = [item.task for item in held]
        return tasks[0] if num_tasks == 1 else tasks

    def delete(self, tasks: Any, total: int | None = None, tally: bool = True) -> int:
        """Commit tasks leased by ``lease()`` as completed; returns how many were committed.

        Takes one task (or its id) or an iterable of them. A task that already finished, or that
        the queue does not know, is skipped (there is nothing left to delete). ``total`` and
        ``tally`` are accepted for python-task-queue; completions are always counted.

        Raises:
            NotLeasedHere: the task is queued, or leased by someone else: its lease token, which
                fences the commit, is theirs.
        """
        del total, tally
        done = 0
        for task_id, item in _task_items(tasks):
            held = self._held.get(task_id)
            if held is not None and (item is task_id or item is held.task):
                done += complete_by_hand(self, self._codec(), held)  # may raise: still held then
                del self._held[task_id]
                continue
            if held is not None:
                continue  # an older lease of it, since leased again: void, as a late result is
            try:
                info = self.backend.find_task(task_id)
            except ValueError:  # not even a task id: the queue cannot hold it
                info = None
            if info is not None and info.status in (TaskStatus.QUEUED, TaskStatus.LEASED):
                raise NotLeasedHere(
                    f"task {task_id} is {info.status.value}, not leased by this TaskQueue: delete() "
                    "commits tasks this object leased (their lease token fences the commit); "
                    "purge() empties a queue"
                )
        return done

    def renew(self, task: Any, seconds: float) -> bool:
        """Extend the lease of a task leased by ``lease()`` to ``seconds`` from now.

        Returns False when the lease had already ended (the task is back in the queue).

        Raises:
            NotLeasedHere: this TaskQueue did not lease it.
        """
        ((task_id, item),) = _task_items(task)
        held = self._held.get(task_id)
        if held is None:
            raise NotLeasedHere(
                f"task {task_id} was not leased by this TaskQueue: renew() needs its lease token"
            )
        if item is not task_id and item is not held.task:
            return False  # an older lease of it, since leased again
        return self.backend.renew(task_id, held.lease.token, seconds)

    def tasks(self) -> Iterator[Any]:
        """Every task in the queue, queued or leased, as ``lease()`` hands them out (without
        leasing them). Each envelope is verified before anything in it is loaded; one that
        fails is skipped with a warning naming it."""
        codec = self._codec()
        for task_id, blob in (*self.backend.iter_queued(), *self.backend.iter_leased()):
            try:
                yield readable_task(codec.decode(task_id, blob, self.backend.get_function), task_id)
            except (BadSignature, DecodeError, TaskRefused) as exc:
                warnings.warn(f"task {task_id} skipped: {exc}", stacklevel=2)

    def list(self) -> builtins.list[Any]:
        """``tasks()`` as a list."""
        return [*self.tasks()]

    def rezero(self) -> Counts:
        """Reset the inserted/failed counters and recount the rest exactly."""
        return self.backend.rezero()

    def purge(self) -> None:
        """Delete everything in the queue: tasks, leases, results, jobs, dead letters."""
        self.backend.purge()

    def dead(self) -> builtins.list[DeadLetter]:
        """Tasks that failed for good."""
        return self.backend.dead()

    def redrive(self, task_ids: Sequence[str] | None = None) -> int:
        """Queue dead letters again with a fresh attempt count, with the same code they were
        queued with (a bug fixed since is not picked up: ``job.retry(fn=fixed)`` does that)."""
        return self.backend.redrive(task_ids)

    def purge_dead(self, task_ids: Sequence[str] | None = None) -> int:
        """Delete dead letters."""
        return self.backend.purge_dead(task_ids)

    def __repr__(self) -> str:
        return f"TaskQueue({self.url!r})"


class LocalTaskQueue(TaskQueue):
    """Runs inserted tasks at once, in ``parallel`` local processes (0 or 1: in this process;
    True: one per CPU, as in python-task-queue).

    Uses the same envelopes, leases, retries and completion store as any queue (an in-process
    mem:// one), so a task behaves here as it will on remote workers. Unlike python-task-queue,
    ``insert`` runs the tasks before it returns (nothing waits for an ``execute()`` that might
    be forgotten); ``insert_all`` and ``execute`` are there for its scripts.
    """

    def __init__(
        self,
        parallel: int | bool = 1,
        *,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        progress: bool = True,
    ) -> None:
        super().__init__(f"mem://local-{uuid.uuid4().hex}", progress=progress)
        self.parallel = (os.cpu_count() or 1) if parallel is True else int(parallel)
        self.max_attempts = max_attempts

    def insert(self, tasks: Any, **options: Any) -> Job:
        """Insert, run every task, and return the finished Job."""
        job = super().insert(tasks, **options)
        self.execute()
        return job

    def execute(self) -> None:
        """Run every task still queued (``insert`` already ran its own), retries included."""
        if self.parallel <= 1:
            self.poll(max_attempts=self.max_attempts, lease_seconds=3600, burst=True)
        else:
            run_in_processes(self, self.parallel, self.max_attempts)

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.execute()
        finally:
            self.close()


# -- helpers ----------------------------------------------------------------------------------------
def _delay_of(delay: float | None, eta: datetime.datetime | None, delay_seconds: float | None) -> float:
    """Seconds until tasks become ready, from at most one of ``delay``, ``eta`` and
    python-task-queue's ``delay_seconds``."""
    given = [
        name for name, value in (("delay", delay), ("eta", eta), ("delay_seconds", delay_seconds)) if value
    ]
    if len(given) > 1:
        raise ValueError(f"give one of {' and '.join(given)}: they say the same thing")
    if eta is not None:
        if not isinstance(eta, datetime.datetime):
            raise TypeError(f"eta must be a datetime, not {type(eta).__name__}")
        return max(eta.timestamp() - time.time(), 0.0)
    seconds = float(delay or delay_seconds or 0.0)
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"a delay must be a number of seconds, not negative: {seconds}")
    return seconds


def _task_items(tasks: Any) -> list[tuple[str, Any]]:
    """``(queue id, item)`` for one task, one id, or an iterable of either."""
    if isinstance(tasks, str):
        return [(tasks, tasks)]
    task_id = queue_id_of(tasks)
    if task_id is not None:
        return [(task_id, tasks)]
    if is_single_task(tasks):
        raise NotLeasedHere(f"{tasks!r:.80} was not read from a queue: it has no task id")
    return [pair for task in tasks for pair in _task_items(task)]


def _stop_asker(stop_fn: Callable[..., bool], worker: Worker) -> Callable[[], bool]:
    """``stop_fn`` called with what it names of ``STOP_FN_ARGUMENTS``, from ``worker``'s state."""
    if not callable(stop_fn):
        raise ValueError(f"stop_fn must be callable, not {stop_fn!r}")
    params = inspect.signature(stop_fn).parameters.values()
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for p in params:
        if p.name not in STOP_FN_ARGUMENTS and p.default is p.empty and p.kind in named_kinds:
            raise ValueError(f"stop_fn takes {p.name!r}: it may take only {', '.join(STOP_FN_ARGUMENTS)}")
    wanted = set(STOP_FN_ARGUMENTS) if takes_all else {p.name for p in params} & set(STOP_FN_ARGUMENTS)
    start = time.monotonic()

    def ask() -> bool:
        values = {
            "executed": worker.executed,
            "tries": worker.empty_leases,
            "previous_execution_time": worker.last_task_seconds,
            "elapsed_time": time.monotonic() - start,
        }
        return bool(stop_fn(**{name: values[name] for name in wanted}))

    return ask


@contextlib.contextmanager
def _interrupts_stop(worker: Worker) -> Iterator[None]:
    """In the main thread, a first Ctrl-C (or SIGTERM) stops ``worker`` after its running task
    and a second interrupts it; the handlers before are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    before = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    worker.install_signal_handlers()
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _printing_worker_log(on: bool) -> Iterator[None]:
    """While on, the worker's log (a line per task) goes to stdout, and only there."""
    if not on:
        yield
        return
    log = logging.getLogger("nbqueue.worker")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("nbqueue: %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
