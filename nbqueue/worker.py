"""Workers: lease tasks, run them, commit results, retry failures, renew long leases.

``Worker`` is the in-process loop (``TaskQueue.poll``); ``WorkerProcesses`` starts and stops
worker processes (``TaskQueue.spawn_workers``, ``nbqueue worker -p N``). A worker process is
started fresh (never forked from a kernel) and runs only queueable code; with
``only_by_reference`` it runs only installed code, refusing every task that ships a pickle.

A worker tells the queue it is alive with a heartbeat every ``lease / 3`` seconds (from the
thread that renews its leases), valid for one lease, and withdraws it when it stops: that is
what ``nbqueue status`` lists as the workers seen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import inspect
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import defaults
from .backends.base import Backend, Lease, TaskStatus
from .errors import (
    BackendUnavailable,
    BadSignature,
    Cancelled,
    DecodeError,
    SerializationError,
    StorageFull,
    TaskRefused,
    TaskTimeout,
    Terminal,
)
from .ids import job_of
from .keeper import LeaseKeeper, LostLeases, renew_round
from .keeper import available as keeper_available
from .output import captured, echo_to_terminal
from .procs import spawn_pool, worker_id
from .records import error_info, seal_record
from .serialize import Signer, get_serializer
from .tasks import FunctionTask, TaskCall, TaskCodec, TaskContext, check_timeout, running_as, set_queue_id

if TYPE_CHECKING:
    from .connection import QueueConnection

TERMINAL_ERRORS = (BadSignature, DecodeError, TaskRefused, Terminal)
#: The signals ``Worker.install_signal_handlers`` takes over (whoever runs a worker in its main
#: thread for a while, ``TaskQueue.poll``, puts the handlers before back after).
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

log = logging.getLogger("nbqueue.worker")
#: Jobs a worker remembers having noted as served (``Worker._served_jobs``): one more is noted again.
_SERVED_REMEMBERED = 1000


class _GaveUp(Exception):
    """The storage stayed unreachable past the point where the call could still matter, or the
    worker was told to stop while it waited."""


@dataclass
class Outcome:
    """What running one lease produced: a record to commit, or a failure to report."""

    lease: Lease
    record: bytes
    ok: bool
    retry_in: float | None = None  # for failures: None means dead


#: Set when a worker's own second Ctrl-C interrupts it: the one KeyboardInterrupt a task may not swallow.
_interrupting = threading.Event()


@dataclass
class Loaded:
    """A leased task decoded and ready to run, with when its attempt started."""

    lease: Lease
    call: TaskCall
    started: float

    @property
    def is_coroutine(self) -> bool:
        """True for an ``async def`` task: running it gives a coroutine to await."""
        fn = self.call.fn if self.call.fn is not None else getattr(self.call.obj, "execute", None)
        return inspect.iscoroutinefunction(fn)

    def context(self, who: str) -> TaskContext:
        lease = self.lease
        job = job_of(lease.task_id)
        return TaskContext(
            lease.task_id, job, lease.attempt, lease.token, who, reporter=progress_board.report
        )


class ProgressBoard:
    """The latest progress each running task of this process reported (``TaskContext.progress``),
    kept here until the worker's next heartbeat carries it: a task may report a million times,
    the storage sees one heartbeat a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, list[Any]] = {}  # task id -> [done, total, note, reported at]
        self._changed = False

    def report(self, task_id: str, done: float, total: float | None, note: str) -> None:
        """Keep a task's latest progress (what ``TaskContext.progress`` calls)."""
        with self._lock:
            self._latest[task_id] = [done, total, note, time.time()]
            self._changed = True

    def forget(self, task_id: str) -> None:
        """The task ended: its progress goes with the next heartbeat."""
        if task_id not in self._latest:  # most tasks never report: no lock for them
            return
        with self._lock:
            if self._latest.pop(task_id, None) is not None:
                self._changed = True

    @property
    def changed(self) -> bool:
        """Whether anything changed since ``take_changes`` was last called."""
        return self._changed

    def take_changes(self) -> None:
        """What changed is about to be sent (a heartbeat follows)."""
        self._changed = False

    def current(self) -> dict[str, list[Any]]:
        """Every running task's latest progress."""
        with self._lock:
            return {task_id: list(entry) for task_id, entry in self._latest.items()}


#: This process's board: tasks report to it from any thread or coroutine.
progress_board = ProgressBoard()


def load(codec: TaskCodec, lease: Lease, fetch_function, max_attempts: int, who: str) -> Loaded | Outcome:
    """Decode one leased task: ready to run, or the failure of a task that cannot be loaded.

    Raises _GaveUp (or BackendUnavailable, from a ``fetch_function`` that does not retry) when the
    storage failed while loading the task: that is the storage's fault, not the task's, and the
    worker decides what to do.
    """
    started = time.time()
    try:
        return Loaded(lease, codec.decode(lease.task_id, lease.payload, fetch_function), started)
    except (BackendUnavailable, _GaveUp):
        raise
    except Exception as exc:
        return _failed(codec, lease, exc, max_attempts, who, started)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in another thread at its next Python instruction (None: take back one
    raised there but not delivered yet). Code inside a C call sees it only once the call returns."""
    raised = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), raised)


class _Slot:
    """One running task: the thread it runs on, or the asyncio task that runs it."""

    def __init__(self, limit: float | None) -> None:
        self.thread = threading.get_ident()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future | None = None
        self.reason: type[BaseException] | None = None  #: what it was told: Cancelled, ...
        self.limit = limit  #: seconds it may run (None: no limit)
        self.deadline = None if limit is None else time.monotonic() + limit


class Interrupts:
    """The tasks running on a worker now, and how to tell each to stop: an exception raised
    inside it (``Cancelled``), in its thread or, for a coroutine, through asyncio.

    Raising into a thread is safe only while the task's own code runs: a task is told only while
    registered, and leaving takes back an exception raised but not delivered yet, both under one
    lock, so worker code never sees one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        #: A signal with a do-nothing handler (see ``wake_main_thread``), or None.
        self.wake_signal: int | None = None

    def wake_main_thread(self) -> None:
        """From the main thread: let a telling also wake a task blocked in a system call there
        (``time.sleep``, a socket read, waiting on a subprocess). The signal interrupts the call,
        its handler runs, and the exception raised into the thread is delivered in it."""
        self.wake_signal = signal.SIGUSR1  # one of HANDLED_SIGNALS
        signal.signal(self.wake_signal, lambda signum, frame: None)

    @contextlib.contextmanager
    def running(self, task_id: str, limit: float | None = None) -> Iterator[_Slot]:
        """Register the task run inside the block (in this thread, until a coroutine is set),
        with the seconds it may run."""
        slot = _Slot(limit)
        with self._lock:
            self._slots[task_id] = slot
        try:
            yield slot
        finally:
            with self._lock:
                del self._slots[task_id]
                if slot.reason is not None and slot.future is None:
                    _raise_in_thread(slot.thread, None)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def overdue(self) -> list[str]:
        """Tasks past their time limit that were not told yet."""
        now = time.monotonic()
        with self._lock:
            return [
                task_id
                for task_id, slot in self._slots.items()
                if slot.deadline is not None and now > slot.deadline and slot.reason is None
            ]

    def tell(self, task_id: str, reason: type[BaseException]) -> bool:
        """Raise ``reason`` inside the task, once; False if it is not running (or was told)."""
        with self._lock:
            slot = self._slots.get(task_id)
            if slot is None or slot.reason is not None:
                return False
            slot.reason = reason
            if slot.future is not None and slot.loop is not None:
                slot.loop.call_soon_threadsafe(slot.future.cancel)
            else:
                _raise_in_thread(slot.thread, reason)
                if self.wake_signal is not None and slot.thread == threading.main_thread().ident:
                    signal.pthread_kill(slot.thread, self.wake_signal)
            return True


def _why_stopped(slot: _Slot, exc: BaseException) -> BaseException:
    """The exception to record for a task that raised ``exc``: what it was told, when the
    telling is what stopped it (a coroutine sees asyncio's CancelledError)."""
    if slot.reason is None or not isinstance(exc, (slot.reason, asyncio.CancelledError)):
        return exc
    if slot.reason is TaskTimeout:
        told: BaseException = TaskTimeout(f"the task ran past its time limit of {slot.limit:g}s")
    else:
        told = slot.reason("the task was cancelled while it ran")
    return told.with_traceback(exc.__traceback__)


def run_on_loop(loop: asyncio.AbstractEventLoop, coroutine: Any, slot: _Slot) -> Any:
    """Run a task's coroutine to its end on ``loop``, told to stop through asyncio (``slot``)."""

    async def told_through_asyncio() -> Any:
        slot.loop, slot.future = loop, asyncio.current_task()
        return await coroutine

    return loop.run_until_complete(told_through_asyncio())


def _run_on_new_loop(coroutine: Any, slot: _Slot) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return run_on_loop(loop, coroutine, slot)
    finally:
        loop.close()


def run_loaded(
    codec: TaskCodec,
    task: Loaded,
    max_attempts: int,
    who: str,
    run_coroutine: Callable[[Any, _Slot], Any] = _run_on_new_loop,
    interrupts: Interrupts | None = None,
    limit: float | None = None,
) -> Outcome:
    """Run a loaded task here and now (a coroutine task through ``run_coroutine``); never raises
    for the task's own errors. With ``interrupts`` it can be told to stop (see ``Interrupts``),
    and is, once it runs past ``limit`` seconds."""
    interrupts = interrupts or Interrupts()
    slot = None
    with captured() as out:
        try:
            with running_as(task.context(who)), interrupts.running(task.lease.task_id, limit) as slot:
                value = task.call.run()
                if inspect.iscoroutine(value):
                    value = run_coroutine(value, slot)
        except BaseException as exc:
            stopped = exc if slot is None else _why_stopped(slot, exc)
            return _raised(codec, task, stopped, max_attempts, who, out.text())
        finally:
            progress_board.forget(task.lease.task_id)
    return _succeeded(codec, task, value, max_attempts, who, out.text())


async def run_loaded_async(
    codec: TaskCodec, task: Loaded, max_attempts: int, who: str, interrupts: Interrupts, limit: float | None
) -> Outcome:
    """Await a loaded coroutine task on the running event loop; never raises for its errors."""
    slot = None
    # In this asyncio task's own context (its output too); told to stop through asyncio.
    with captured() as out:
        try:
            with running_as(task.context(who)), interrupts.running(task.lease.task_id, limit) as slot:
                slot.loop, slot.future = asyncio.get_running_loop(), asyncio.current_task()
                value = await task.call.run()
        except BaseException as exc:
            stopped = exc if slot is None else _why_stopped(slot, exc)
            return _raised(codec, task, stopped, max_attempts, who, out.text())
        finally:
            progress_board.forget(task.lease.task_id)
    return _succeeded(codec, task, value, max_attempts, who, out.text())


def _succeeded(
    codec: TaskCodec, task: Loaded, value: Any, max_attempts: int, who: str, output: str = ""
) -> Outcome:
    """The outcome of a task that returned ``value`` (having printed ``output``): a failed
    attempt when the value cannot be serialized (a task never counts as completed without a
    value to read back)."""
    params = task.call.params
    try:
        record = _sealed(codec, task.lease, who, task.started, value=value, params=params, output=output)
        return Outcome(task.lease, record, True)
    except SerializationError as exc:
        return _failed(codec, task.lease, exc, max_attempts, who, task.started, params, output)


def _raised(
    codec: TaskCodec, task: Loaded, exc: BaseException, max_attempts: int, who: str, output: str = ""
) -> Outcome:
    """The outcome of a task that raised: sys.exit(), KeyboardInterrupt or any error inside a task
    fails the task, not the worker (but for the worker's own second Ctrl-C)."""
    if isinstance(exc, KeyboardInterrupt) and _interrupting.is_set():
        raise exc
    return _failed(codec, task.lease, exc, max_attempts, who, task.started, task.call.params, output)


def execute(codec: TaskCodec, lease: Lease, fetch_function, max_attempts: int, who: str) -> Outcome:
    """Decode and run one leased task; never raises for the task's own errors (see ``load``)."""
    task = load(codec, lease, fetch_function, max_attempts, who)
    return task if isinstance(task, Outcome) else run_loaded(codec, task, max_attempts, who)


def _sealed(codec: TaskCodec, lease: Lease, who: str, started: float, **outcome: Any) -> bytes:
    """The signed completion record of ``lease``: ``value=``, or ``error=`` (and ``attempt=``)."""
    outcome.setdefault("attempt", lease.attempt)
    return seal_record(
        codec.signer,
        codec.serializer,
        lease.task_id,
        job_of(lease.task_id),
        started=started,
        finished=time.time(),
        worker=who,
        **outcome,
    )


def _failed(
    codec: TaskCodec,
    lease: Lease,
    exc: BaseException,
    max_attempts: int,
    who: str,
    started: float,
    params: dict[str, Any] | None = None,
    output: str = "",
) -> Outcome:
    """A task that raised: retried after a backoff, or dead when terminal or out of attempts."""
    terminal = isinstance(exc, TERMINAL_ERRORS) or lease.charged >= max_attempts
    record = _sealed(codec, lease, who, started, error=error_info(exc), params=params, output=output)
    return Outcome(lease, record, False, None if terminal else defaults.retry_delay(lease.charged))


class Renewer(LostLeases, threading.Thread):
    """Renews every held lease each ``lease_seconds / 3``; records leases it lost.

    With ``heartbeat`` it also calls ``heartbeat(ttl)`` at start and every round with one lease
    as the ttl, and ``heartbeat(0)`` once stopped.
    """

    def __init__(
        self, backend, lease_seconds: float, heartbeat: Callable[[float], None] | None = None
    ) -> None:
        LostLeases.__init__(self)
        threading.Thread.__init__(self, name="nbqueue-renewer", daemon=True)
        self.backend = backend
        self.lease_seconds = lease_seconds
        self.heartbeat = heartbeat
        self.held: dict[str, str] = {}  # task_id -> token
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def hold(self, leases: list[Lease]) -> None:
        with self._lock:
            self.held.update((lease.task_id, lease.token) for lease in leases)

    def drop(self, *task_ids: str) -> None:
        with self._lock:
            for task_id in task_ids:
                self.held.pop(task_id, None)
        self._forget_lost(task_ids)

    def info(self, data: str) -> None:
        """The keeper's heartbeat information; this thread beats through ``heartbeat`` instead."""

    def running(self, lease: Lease, limit: float | None) -> None:
        """What a lease keeper needs to kill a task deaf to a cancel or its time limit; a thread
        cannot."""

    def run(self) -> None:
        self._beat(self.lease_seconds)
        while not self._stop_event.wait(self.lease_seconds / 3):
            for task_id, token in renew_round(self.backend, self.held, self._lock, self.lease_seconds):
                self._mark_lost(task_id, token)
            self._beat(self.lease_seconds)

    def _beat(self, ttl: float) -> None:
        if self.heartbeat is None:
            return
        with contextlib.suppress(Exception):  # the heartbeat is informative: next round beats again
            self.heartbeat(ttl)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self._beat(0)  # withdraw: this worker is gone


#: What renews a worker's leases: a thread here, or a keeper process (the default).
LeaseRenewal = Renewer | LeaseKeeper


@dataclass
class WorkerStats:
    """What one worker did."""

    completed: int = 0
    failed: int = 0
    dead: int = 0
    cancelled: int = 0
    abandoned: int = 0
    released: int = 0
    refused: int = 0
    elapsed: float = 0.0


#: How often a worker checks whether its running task has outlasted its batch.
_GIVE_BACK_CHECK_SECONDS = 0.1
#: Jobs whose task durations a worker remembers (the most recently run).
_ESTIMATES_KEPT = 256


@dataclass
class _Source:
    """One queue a worker drains: its connection, the codec that checks its tasks, and the
    renewer of its leases (started by ``Worker.run``)."""

    queue: QueueConnection
    backend: Backend
    codec: TaskCodec
    renewer: LeaseRenewal | None = None


class _Batch:
    """The leases of one batch not started yet, shared between the worker's loop, which starts
    them one by one, and its give-back thread, which takes them back when the running task has
    outlasted what the batch was sized for."""

    def __init__(self, leases: list[Lease], renewer: LeaseRenewal, backend: Backend) -> None:
        self.renewer, self.backend = renewer, backend  # of the queue the leases came from
        self._lock = threading.Lock()
        self._unstarted = collections.deque(leases)
        self._running_since: float | None = None
        self._budget = 0.0

    def start_next(self, budget: Callable[[Lease], float]) -> Lease | None:
        """The next lease to run (None: the batch is done, or was given back)."""
        with self._lock:
            if not self._unstarted:
                return None
            lease = self._unstarted.popleft()
            self._running_since, self._budget = time.monotonic(), budget(lease)
            return lease

    def finished(self) -> None:
        with self._lock:
            self._running_since = None

    def unstarted_ids(self) -> list[str]:
        with self._lock:
            return [lease.task_id for lease in self._unstarted]

    def take(self, task_ids: set[str]) -> list[Lease]:
        """The unstarted leases of these tasks, taken out of the batch."""
        with self._lock:
            taken = [lease for lease in self._unstarted if lease.task_id in task_ids]
            if taken:
                self._unstarted = collections.deque(x for x in self._unstarted if x.task_id not in task_ids)
            return taken

    def rest(self) -> list[Lease]:
        """Every lease not started yet, taken out of the batch."""
        with self._lock:
            taken = list(self._unstarted)
            self._unstarted.clear()
            return taken

    def overdue(self) -> list[Lease]:
        """``rest()`` once the running task has run past its budget; else nothing."""
        with self._lock:
            running = self._running_since
            if running is None or not self._unstarted or time.monotonic() - running <= self._budget:
                return []
        return self.rest()


class Worker:
    """The lease loop of one process or thread.

    Leases in batches sized to hold about ``LEASE_BATCH_TARGET_SECONDS`` of work by each job's
    measured task duration (slow start: the first lease takes one task, and a batch grows only
    once the job served last is measured quick, so slow tasks spread over every worker), gives a
    batch's unstarted tasks back while a task outlasts what the batch was sized for, renews
    leases from a thread, commits a batch's results
    together (at least every half second), retries failures with backoff and sends terminal ones
    to the dead letters.
    """

    def __init__(
        self,
        queue: QueueConnection,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        burst: bool = False,
        max_tasks: int | None = None,
        idle_exit: float | None = None,
        batch_max: int = defaults.LEASE_BATCH_MAX,
        only_by_reference: bool = False,
        renewal: str = "thread",
        stop_when: Callable[[], bool] | None = None,
        concurrency: int = 1,
        also: Sequence[QueueConnection] = (),
        task_timeout: float | None = None,
        echo_output: bool = False,
    ) -> None:
        """``echo_output``: what tasks print also goes to this process's terminal (it is kept with
        each task's record either way)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.only_by_reference = only_by_reference
        #: The queues this worker drains, in order: a task of the first that has one, always.
        self.sources = [self._source(q) for q in (queue, *also)]
        self._use(self.sources[0])
        if renewal not in ("thread", "process"):
            raise ValueError("renewal must be 'thread' or 'process'")
        if renewal == "process" and (not keeper_available() or queue.url.startswith("mem://")):
            renewal = "thread"  # a keeper needs /proc, and a queue another process can open
        self.renewal = renewal
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.burst = burst
        self.max_tasks = max_tasks
        self.idle_exit = idle_exit
        #: ``async def`` tasks a batch runs at once on this worker's event loop; with more than
        #: one, a batch holds up to that many tasks even past ``batch_max``.
        self.concurrency = concurrency
        self.batch_max = max(1, batch_max, concurrency)
        #: Seconds a task without a limit of its own (job's or function's) may run; None: no limit.
        self.task_timeout = check_timeout(task_timeout)
        echo_to_terminal(echo_output)
        self._loop: asyncio.AbstractEventLoop | None = None  # made at the first coroutine task
        self.stats = WorkerStats()
        #: Asked after every task run and every lease that found nothing: True stops the worker
        #: as ``stop()`` does (python-task-queue's ``stop_fn``).
        self.stop_when = stop_when
        self.executed = 0  #: tasks run, whatever their outcome
        self.empty_leases = 0  #: leases in a row that found nothing
        self.last_task_seconds = 0.0
        self.stop_event = threading.Event()
        self.who = worker_id()
        self.started = time.time()
        # Slow start: a task's duration is estimated per job (seconds, a moving average), and a
        # job with no estimate yet is leased one task at a time until its first task has run.
        self._estimates: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._next_job: str | None = None  # the job the queue handed out last: likely next
        self._batch: _Batch | None = None  # the batch running now (see _watch)
        self.interrupts = Interrupts()  #: the tasks running now, which _watch may tell to stop
        self._one_at_a_time = False  # after a batch with a suspect: lease singly (_isolate_suspects)
        #: (queue, job) pairs this worker has told the storage it served (``add_job_worker``), newest last.
        self._served: collections.OrderedDict[tuple[int, str], None] = collections.OrderedDict()

    # -- control --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the running task, give back the rest, then return from run()."""
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop gracefully; a second SIGINT interrupts at once."""

        def graceful(signum, frame):
            if self.stop_event.is_set() and signum == signal.SIGINT:
                _interrupting.set()
                raise KeyboardInterrupt
            if signum == signal.SIGINT:
                print(
                    "nbqueue: interrupted: stopping after the running task; interrupt again to stop now",
                    file=sys.stderr,
                    flush=True,
                )
            self.stop()

        signal.signal(signal.SIGTERM, graceful)
        signal.signal(signal.SIGINT, graceful)
        self.interrupts.wake_main_thread()

    # -- storage calls that survive outages ------------------------------------------------------
    def _call(
        self,
        fn,
        *args,
        give_up_after: float | None = None,
        hold: tuple[LeaseRenewal, list[Lease]] | None = None,
        **kwargs,
    ):
        """Call the backend, retrying with capped exponential backoff while it is unreachable or
        full.

        An outage is waited out for ``give_up_after`` seconds at most: leases cannot be renewed
        through it. A full storage is waited out for as long as it lasts, since renewals still
        work: with ``hold=(renewer, leases)`` those leases are renewed while it waits, and dropped
        for each try, so no renewal races the call. Either wait ends (``_GaveUp``) when the worker
        is told to stop; leases not reported then expire and their tasks run again.
        """
        delay = defaults.RECONNECT_FIRST
        down = full = None  # when the outage, or the full storage, began
        while True:
            try:
                result = fn(*args, **kwargs)
            except BackendUnavailable as exc:
                if down is None:
                    down = time.monotonic()
                    log.warning("%s; retrying", exc)
                too_long = give_up_after is not None and time.monotonic() - down > give_up_after
                if too_long or self.stop_event.is_set():
                    raise _GaveUp(str(exc)) from exc
                keep = None  # renewals cannot reach it either
            except StorageFull as exc:
                if full is None:
                    full = time.monotonic()
                    log.warning("%s; waiting for space", exc)
                if self.stop_event.is_set():
                    log.warning("told to stop while the storage is full: unreported leases will expire")
                    raise _GaveUp(str(exc)) from exc
                keep = hold
            else:
                if down is not None:
                    log.warning("storage reachable again after %.1fs", time.monotonic() - down)
                if full is not None:
                    log.warning("storage has space again after %.1fs", time.monotonic() - full)
                return result
            if keep is not None:
                keep[0].hold(keep[1])
            self.stop_event.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, defaults.RECONNECT_MAX)
            if keep is not None:
                keep[0].drop(*(lease.task_id for lease in keep[1]))

    # -- the queues it drains -------------------------------------------------------------------
    def _source(self, queue: QueueConnection) -> _Source:
        backend = queue.backend
        codec = TaskCodec(
            queue.signer,
            queue.serializer,
            None,  # read at the first task, through the outage-tolerant call
            refresh_queue_id=lambda: self._call(backend.queue_id, give_up_after=self.lease_seconds),
            only_by_reference=self.only_by_reference,
        )
        return _Source(queue, backend, codec)

    def _use(self, source: _Source) -> None:
        """Lease, run and report through ``source`` (until the next call)."""
        self.source = source
        self.queue, self.backend, self.codec = source.queue, source.backend, source.codec

    def _heartbeat(self, backend: Backend, ttl: float) -> None:
        """Tell a queue this worker is alive for ``ttl`` seconds (0: it is gone)."""
        backend.heartbeat(self.who, self._heartbeat_info().encode(), ttl)

    def _heartbeat_info(self) -> str:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "beat": time.time(),
            "lease": self.lease_seconds,
            "only_by_reference": self.only_by_reference,
            "completed": self.stats.completed,
            "failed": self.stats.failed,
            "progress": progress_board.current(),
            # What runs now (not leases held ahead): a view's "running" never exceeds the slots.
            "running": self.interrupts.running_ids(),
            "slots": self.concurrency,
        }
        return json.dumps(info)

    def _make_renewer(self, source: _Source) -> LeaseRenewal:
        """Renewal from a keeper process (immune to tasks that hold the GIL) or from a thread."""
        if self.renewal == "process":
            queue = source.queue
            return LeaseKeeper(
                queue.worker_url, self.lease_seconds, self.who, queue.insecure, self.max_attempts
            )
        beat = functools.partial(self._heartbeat, source.backend)
        return Renewer(source.backend, self.lease_seconds, heartbeat=beat)

    def _fetch_function(self, digest: str) -> bytes:
        return self._call(self.backend.get_function, digest, give_up_after=self.lease_seconds)

    # -- loop -----------------------------------------------------------------------------------
    def _estimate(self, job_id: str | None) -> float | None:
        return None if job_id is None else self._estimates.get(job_id)

    def _measured(self, job_id: str, seconds: float) -> None:
        estimates = self._estimates
        known = estimates.get(job_id)
        if known is not None:  # the common case, task after task of one job: no reordering
            estimates[job_id] = 0.8 * known + 0.2 * seconds
            return
        estimates[job_id] = seconds  # new: the most recent, so the last to be forgotten
        while len(estimates) > _ESTIMATES_KEPT:
            estimates.popitem(last=False)

    def _batch_size(self) -> int:
        # Side by side, a batch of `concurrency` coroutines takes one task's time: slow start
        # begins with that many, or the slots would wait for tasks queued behind a slow one.
        slots = self.concurrency
        estimate = self._estimate(self._next_job)
        if self._one_at_a_time:
            return 1
        if estimate is None:
            return slots
        want = int(slots * defaults.LEASE_BATCH_TARGET_SECONDS / max(estimate, 1e-4))
        if self.max_tasks is not None:
            want = min(want, self.max_tasks - self._done())
        return max(1, min(self.batch_max, max(want, slots)))

    def _done(self) -> int:
        s = self.stats
        return s.completed + s.failed + s.abandoned

    def _nothing_left(self, idle: float) -> bool:
        """Burst mode ends when nothing is queued or leased anywhere: a lease held by a worker
        that died comes back to us when it expires. Counters that drifted (a process killed
        mid-write) cannot keep us forever: past the longest wait that can matter, we stop."""
        try:
            counts = [self._call(source.backend.counts) for source in self.sources]
            left = sum(c.waiting + c.leased for c in counts)
        except _GaveUp:  # told to stop during an outage
            return True
        return left <= 0 or idle > 2 * max(defaults.RETRY_MAX_SECONDS, self.lease_seconds)

    def run(self) -> WorkerStats:
        """Work until stopped, ``max_tasks`` ran, or (with ``burst``) the queue is empty."""
        start = time.monotonic()
        for source in self.sources:
            source.renewer = self._make_renewer(source)
            source.renewer.start()
            source.renewer.info(self._heartbeat_info())
        finished = threading.Event()
        giver = threading.Thread(target=self._watch, args=(finished,), name="nbqueue-watch", daemon=True)
        giver.start()
        idle_since = None
        sleep = defaults.IDLE_SLEEP_MIN
        # Block on the storage for work only with one queue: with several, each is asked in turn.
        # Not in burst mode either: a burst worker asks "is anything left?" as soon as the queue
        # looks empty, instead of sleeping on the storage for a second first.
        block = len(self.sources) == 1 and self.backend.blocking_lease and not self.burst
        try:
            while not self.stop_event.is_set():
                if self.max_tasks is not None and self._done() >= self.max_tasks:
                    break
                try:
                    leases = self._lease(block)
                except _GaveUp:
                    break  # told to stop while the storage was down: nothing is held
                if not leases:
                    self.empty_leases += 1
                    if self._asked_to_stop():
                        break
                    idle_since = idle_since or time.monotonic()
                    idle = time.monotonic() - idle_since
                    if self.burst and self._nothing_left(idle):
                        break
                    if self.idle_exit is not None and idle > self.idle_exit:
                        break
                    if not block:
                        self.stop_event.wait(sleep * random.uniform(0.5, 1.0))
                        sleep = min(sleep * 2, defaults.IDLE_SLEEP_MAX)
                    continue
                idle_since, sleep = None, defaults.IDLE_SLEEP_MIN
                self.empty_leases = 0
                renewer = self.source.renewer
                assert renewer is not None, "started above, one per queue"
                renewer.hold(leases)
                self._run_batch(leases, renewer)
                renewer.info(self._heartbeat_info())
        finally:
            finished.set()
            giver.join()
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            for source in self.sources:
                if source.renewer is not None:
                    source.renewer.stop()
            self.stats.elapsed = time.monotonic() - start
        return self.stats

    def _lease(self, block: bool) -> list[Lease]:
        """A batch from the first queue (in the order given) that has tasks ready; the worker
        then uses that queue (``_use``) until the next lease."""
        for source in self.sources:
            self._use(source)
            leases = self._call(
                source.backend.lease,
                self._batch_size(),
                self.lease_seconds,
                wait=defaults.BLOCK_SECONDS if block else 0.0,
            )
            if leases:
                return leases
        return []

    def _asked_to_stop(self) -> bool:
        """Ask ``stop_when``; a yes stops the worker (as ``stop()`` does)."""
        if self.stop_when is not None and self.stop_when():
            self.stop_event.set()
        return self.stop_event.is_set()

    def _isolate_suspects(self, leases: list[Lease], renewer: LeaseRenewal) -> list[Lease]:
        """A suspect (a lease of it expired: its worker died with it) may be what killed that
        worker, and its next expiry is charged: so it runs alone, and an innocent batch-mate is
        never lost with it. The rest of the batch goes back unstarted (a release costs nothing)."""
        suspect = next((lease for lease in leases if lease.suspect), None)
        # A dead worker's batch comes back as suspects side by side: lease them one at a time
        # until a batch holds none, instead of releasing the rest of a batch of them each round.
        self._one_at_a_time = suspect is not None
        if suspect is None or len(leases) == 1:
            return leases
        self._release([other for other in leases if other is not suspect], renewer)
        return [suspect]

    def _fit_to_estimates(self, leases: list[Lease], renewer: LeaseRenewal) -> list[Lease]:
        """Keep what fits the batch's target time by each job's estimate (always the first task)
        and give the rest back unstarted: jobs take turns, so a lease sized for one job may bring
        tasks of another, slower one. A job not measured yet counts as quick: its first task
        measures it, and should that one run long, the give-back thread returns the rest (giving
        them back now would cost a release per task whenever a new job's turn comes)."""
        self._next_job = job_of(leases[-1].task_id)
        planned = 0.0
        for i, lease in enumerate(leases):
            # `concurrency` coroutines share the time: each costs the batch its share.
            planned += (self._estimate(job_of(lease.task_id)) or 0.0) / self.concurrency
            if i >= self.concurrency and planned > defaults.LEASE_BATCH_TARGET_SECONDS:
                self._release(leases[i:], renewer)
                return leases[:i]
        return leases

    def _watch(self, done: threading.Event) -> None:
        """Thread: while a task runs longer than its batch was sized for, the batch's unstarted
        tasks go back to the queue (uncharged) for idle workers, instead of waiting behind it;
        every ``CANCEL_CHECK_SECONDS``, tasks held that were cancelled are told (see ``_obey_cancels``);
        progress reported by running tasks, and which tasks run, go out with a heartbeat at most
        every ``PROGRESS_BEAT_SECONDS`` when they changed."""
        checked = beat = time.monotonic()
        running: list[str] = []  # what the last beat said runs
        ticked: list[str] = []  # what ran at the last tick
        while not done.wait(_GIVE_BACK_CHECK_SECONDS):
            batch = self._batch
            overdue = batch.overdue() if batch is not None else []
            if batch is not None and overdue:
                log.info("gave back %d unstarted task(s): the running one outlasted its batch", len(overdue))
                self._release(overdue, batch.renewer, batch.backend)
            for task_id in self.interrupts.overdue():
                if self.interrupts.tell(task_id, TaskTimeout):
                    log.warning("task %s ran past its time limit: told it to stop", task_id)
            if time.monotonic() - checked >= defaults.CANCEL_CHECK_SECONDS:
                checked = time.monotonic()
                try:
                    self._obey_cancels(batch)
                except Exception as exc:  # a storage hiccup: the next check asks again
                    log.debug("cancel check failed: %s", exc)
            # "Nothing runs" is beaten once it held for a tick: a task that just ended is being
            # committed now, and a beat in the middle of that commit (the GIL, the storage) would
            # widen fq://'s moment between a lease leaving and its counters landing.
            now_running = self.interrupts.running_ids()
            held, ticked = now_running == ticked, now_running
            changed = progress_board.changed or (now_running != running and (bool(now_running) or held))
            if changed and time.monotonic() - beat >= defaults.PROGRESS_BEAT_SECONDS:
                beat, running = time.monotonic(), now_running
                self._beat_progress(batch)

    def _beat_progress(self, batch: _Batch | None) -> None:
        """A heartbeat now, carrying the running tasks' latest progress (``ProgressBoard``)."""
        progress_board.take_changes()
        info = self._heartbeat_info()
        renewer = batch.renewer if batch is not None else self.source.renewer
        if renewer is not None:
            renewer.info(info)  # the keeper's own beats then carry it too
        backend = batch.backend if batch is not None else self.backend
        try:
            backend.heartbeat(self.who, info.encode(), self.lease_seconds)
        except Exception as exc:  # informative only: the next beat carries it
            log.debug("progress heartbeat failed: %s", exc)

    def _obey_cancels(self, batch: _Batch | None) -> None:
        """One question to the storage for every task this worker holds: a running task that was
        cancelled gets ``Cancelled`` raised inside it; an unstarted one goes back (and ends
        cancelled there, never run)."""
        running = self.interrupts.running_ids()
        unstarted = batch.unstarted_ids() if batch is not None else []
        if not running and not unstarted:
            return
        backend = batch.backend if batch is not None else self.backend
        marked = backend.cancel_requested(running + unstarted)
        if not marked:
            return
        for task_id in running:
            if task_id in marked and self.interrupts.tell(task_id, Cancelled):
                log.warning("task %s was cancelled: told it to stop", task_id)
        if batch is not None:
            dropped = batch.take(marked)
            if dropped:
                self._release(dropped, batch.renewer, batch.backend)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """This worker's event loop (kept from task to task, so what a task caches on the loop, a
        client session say, lives on)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def _await(self, coroutine: Any, slot: _Slot) -> Any:
        """Run a coroutine task to its end on this worker's event loop."""
        return run_on_loop(self._event_loop(), coroutine, slot)

    def _run_batch(self, leases: list[Lease], renewer: LeaseRenewal) -> None:
        if self.concurrency > 1:
            self._run_batch_concurrently(leases, renewer)
            return
        pending: list[Outcome] = []
        first_pending = 0.0
        leases = self._isolate_suspects(self._fit_to_estimates(leases, renewer), renewer)
        batch = self._batch = _Batch(leases, renewer, self.backend)
        try:
            while True:
                # Commit what is done before starting more work once it has waited half a second,
                # so a slow task never holds back its batch-mates' results.
                if pending and time.monotonic() - first_pending > 0.5:
                    self._commit(pending, renewer)
                    pending = []
                if self.stop_event.is_set():
                    self._release(batch.rest(), renewer)
                    break
                lease = batch.start_next(self._give_back_after)
                if lease is None:
                    break
                if lease.charged > self.max_attempts:
                    # Its charged attempts never reported back: each time it ran alone, its worker
                    # died (or hung). Running it again would only crash-loop the workers.
                    self._report_failure(self._crashed(lease), renewer)
                    continue
                t = time.monotonic()
                task = self._load(lease, renewer)
                if task is None:
                    continue
                if isinstance(task, Loaded):
                    renewer.running(lease, self._limit(task))
                outcome = task if isinstance(task, Outcome) else self._run_here(task)
                batch.finished()
                self._ran(lease, time.monotonic() - t, outcome.ok)
                self._asked_to_stop()  # the rest of the batch goes back at the top of the loop
                if self._to_commit(outcome, renewer):
                    if not pending:
                        first_pending = time.monotonic()
                    pending.append(outcome)
        finally:
            self._batch = None
            self._commit(pending, renewer)  # even when interrupted: finished work is kept

    def _run_batch_concurrently(self, leases: list[Lease], renewer: LeaseRenewal) -> None:
        """A batch on a worker with ``concurrency`` > 1: its ``async def`` tasks run side by side
        on the event loop, up to ``concurrency`` at once; its other tasks run one by one first,
        outside the loop (a task may run its own event loop)."""
        leases = self._isolate_suspects(self._fit_to_estimates(leases, renewer), renewer)
        outcomes: list[Outcome] = []
        coroutines: list[Loaded] = []
        for lease in leases:
            if self.stop_event.is_set():
                self._release([lease], renewer)
                continue
            if lease.charged > self.max_attempts:
                outcomes.append(self._crashed(lease))
                continue
            t = time.monotonic()
            task = self._load(lease, renewer)
            if task is None:
                continue
            if isinstance(task, Loaded) and task.is_coroutine:
                coroutines.append(task)
                continue
            outcome = task if isinstance(task, Outcome) else self._run_here(task)
            self._ran(lease, time.monotonic() - t, outcome.ok)
            outcomes.append(outcome)
        if coroutines:
            t = time.monotonic()
            awaited = self._event_loop().run_until_complete(self._gather(coroutines))
            # Side by side, each costs the batch its share of the time: that sizes the next one.
            share = (time.monotonic() - t) / len(coroutines)
            for outcome in awaited:
                self._ran(outcome.lease, share, outcome.ok)
            outcomes += awaited
        self._commit([outcome for outcome in outcomes if self._to_commit(outcome, renewer)], renewer)
        self._asked_to_stop()

    async def _gather(self, tasks: list[Loaded]) -> list[Outcome]:
        slots = asyncio.Semaphore(self.concurrency)

        async def one(task: Loaded) -> Outcome:
            async with slots:
                return await run_loaded_async(
                    self.codec, task, self.max_attempts, self.who, self.interrupts, self._limit(task)
                )

        return list(await asyncio.gather(*(one(task) for task in tasks)))

    def _ran(self, lease: Lease, seconds: float, ok: bool) -> None:
        """Count one task run and learn its job's task time from it."""
        self.last_task_seconds = seconds
        self._measured(job_of(lease.task_id), seconds)
        self.executed += 1
        log.info("%s %s in %.3fs", "ran" if ok else "failed", lease.task_id, seconds)

    def _load(self, lease: Lease, renewer: LeaseRenewal) -> Loaded | Outcome | None:
        """``lease``'s task decoded, or the failure of one that cannot be; None when the storage
        failed while loading it (its lease expires and it runs again)."""
        try:
            return load(self.codec, lease, self._fetch_function, self.max_attempts, self.who)
        except _GaveUp:
            self.stats.abandoned += 1
            renewer.drop(lease.task_id)
            return None

    def _limit(self, task: Loaded) -> float | None:
        """Seconds ``task`` may run: its job's or its function's limit, else this worker's."""
        limit = task.call.time_limit
        return self.task_timeout if limit is None else limit

    def _run_here(self, task: Loaded) -> Outcome:
        return run_loaded(
            self.codec, task, self.max_attempts, self.who, self._await, self.interrupts, self._limit(task)
        )

    def _to_commit(self, outcome: Outcome, renewer: LeaseRenewal) -> bool:
        """True for a success to commit. A failure is reported now; a result whose lease was
        lost meanwhile is void (another worker has the task)."""
        if renewer.has_lost(outcome.lease):
            self.stats.abandoned += 1
            renewer.drop(outcome.lease.task_id)
            return False
        if not outcome.ok:
            self._report_failure(outcome, renewer)
        return outcome.ok

    def _give_back_after(self, lease: Lease) -> float:
        """Seconds ``lease``'s task may run before its batch-mates are given back: what the
        batch was sized for, or twice the task's own estimate when that is longer."""
        estimate = self._estimate(job_of(lease.task_id)) or 0.0
        return max(defaults.LEASE_BATCH_TARGET_SECONDS, 2 * estimate)

    def _release(self, leases: list[Lease], renewer: LeaseRenewal, backend: Backend | None = None) -> None:
        """Give unstarted leases back (their attempts do not count) to ``backend`` (the queue
        in use by default)."""
        release = (backend or self.backend).release
        for lease in leases:
            with contextlib.suppress(_GaveUp):  # unreleased, it comes back when it expires
                self.stats.released += self._call(release, lease.task_id, lease.token, give_up_after=5.0)
            renewer.drop(lease.task_id)

    def _crashed(self, lease: Lease) -> Outcome:
        """The dead letter of a task whose earlier attempts all ended without a result."""
        earlier = lease.charged - 1
        error = {
            "type": "WorkerDied",
            "message": f"{earlier} attempt(s) ended without a result: each time it ran alone, its worker "
            "was killed or crashed (os._exit, a segfault, out of memory) or lost its lease; not run again",
            "traceback": "",
        }
        record = _sealed(self.codec, lease, self.who, time.time(), error=error, attempt=earlier)
        return Outcome(lease, record, False, None)

    def _commit(self, outcomes: list[Outcome], renewer: LeaseRenewal) -> None:
        if not outcomes:
            return
        items = [(o.lease.task_id, o.lease.token, o.record) for o in outcomes]
        leases = [o.lease for o in outcomes]
        renewer.drop(*(lease.task_id for lease in leases))  # stop renewing first: no race with the commit
        try:
            # Hold the results through an outage for as long as the leases can still be ours, and
            # through a full disk for as long as it lasts (the leases are renewed meanwhile).
            accepted = self._call(
                self.backend.complete, items, give_up_after=self.lease_seconds, hold=(renewer, leases)
            )
        except _GaveUp:  # never reported: the leases expire and the tasks run again
            self.stats.abandoned += len(outcomes)
            return
        for ok in accepted:
            if ok:
                self.stats.completed += 1
            else:
                self.stats.refused += 1
        self._served_jobs(leases)

    def _served_jobs(self, leases: list[Lease]) -> None:
        """Tell the storage, once per job, that this worker ran tasks of it (``Job.workers_ran``).
        After the commit, so a task's round trip never waits for it; while the first task runs,
        this worker's heartbeat lists it as running."""
        for job in {job_of(lease.task_id) for lease in leases}:
            key = (id(self.backend), job)
            if key in self._served:
                continue
            try:
                self.backend.add_job_worker(job, self.who)
            except Exception as exc:  # informative only: the next commit of the job tells it again
                log.debug("could not note the job served: %s", exc)
                continue
            self._served[key] = None
            if len(self._served) > _SERVED_REMEMBERED:
                self._served.popitem(last=False)

    def _report_failure(self, outcome: Outcome, renewer: LeaseRenewal) -> None:
        lease = outcome.lease
        renewer.drop(lease.task_id)  # stop renewing first, so no renewal races the report
        try:
            state = self._call(
                self.backend.fail,
                lease.task_id,
                lease.token,
                outcome.record,
                outcome.retry_in,
                give_up_after=self.lease_seconds,
                hold=(renewer, [lease]),
            )
        except _GaveUp:  # never reported: the lease expires and the attempt is made again
            self.stats.abandoned += 1
            return
        self._served_jobs([lease])
        if state is None:
            self.stats.refused += 1
            return
        if state == TaskStatus.CANCELLED:  # its job was cancelled: not a failed attempt
            self.stats.cancelled += 1
            return
        self.stats.failed += 1
        if state == TaskStatus.DEAD:
            self.stats.dead += 1


# -- leases held by user code (python-task-queue's lease / delete / renew) ---------------------------
@dataclass
class HeldTask:
    """A task leased by user code rather than a worker loop: what ``TaskQueue.lease`` handed out,
    and the lease that fences its ``delete`` and ``renew``."""

    lease: Lease
    task: Any  #: a FunctionTask, or the task object itself
    started: float


def readable_task(call: TaskCall, task_id: str) -> Any:
    """A decoded task as user code sees it: the task object itself (its queue id set), or a
    ``FunctionTask``."""
    if call.fn is None and not (call.args or call.kwargs):
        set_queue_id(call.obj, task_id)
        return call.obj
    return FunctionTask(call, task_id)


def lease_by_hand(
    queue: QueueConnection, codec: TaskCodec, n: int, seconds: float, wait: float
) -> list[HeldTask]:
    """Lease up to ``n`` tasks for user code to run. A task no worker would run (bad signature,
    unloadable, refused) goes to the dead letters with the reason, as a worker sends it."""
    held = []
    for lease in queue.backend.lease(n, seconds, wait=wait):
        task = load(codec, lease, queue.backend.get_function, 1, worker_id())
        if isinstance(task, Outcome):  # refused unread: dead at once (max_attempts 1)
            log.warning("task %s sent to the dead letters: it cannot be loaded", lease.task_id)
            queue.backend.fail(lease.task_id, lease.token, task.record, task.retry_in)
            continue
        held.append(HeldTask(lease, readable_task(task.call, lease.task_id), task.started))
    return held


def complete_by_hand(queue: QueueConnection, codec: TaskCodec, held: HeldTask) -> bool:
    """Commit a task leased by hand as completed, with the value its ``execute()`` returned if
    it ran as a FunctionTask (else None). False when the lease was no longer ours.

    Raises:
        SerializationError: the value cannot be serialized; nothing was committed.
    """
    value = held.task.value if isinstance(held.task, FunctionTask) else None
    record = _sealed(codec, held.lease, worker_id(), held.started, value=value)
    return queue.backend.complete([(held.lease.task_id, held.lease.token, record)])[0]


# -- processes ------------------------------------------------------------------------------------
def worker_env(*urls: str) -> dict[str, str]:
    """The environment that tells a worker process its queues, out of sight of ``ps``: one URL,
    or several on lines of their own (a path may hold spaces), drained in that order."""
    return {defaults.ENV_URL: "\n".join(urls)}


def worker_command(
    *,
    lease_seconds: float | None = None,
    burst: bool = False,
    max_tasks: int | None = None,
    max_attempts: int | None = None,
    idle_exit: float | None = None,
    insecure: bool = False,
    only_by_reference: bool = False,
    renewal: str | None = None,
    concurrency: int = 1,
    task_timeout: float | None = None,
    echo_output: bool = False,
) -> list[str]:
    """The command line of one worker process (the queue URL travels in its environment)."""
    # No URL here: it may hold a password, and argv is visible to every user (ps). Children get
    # it from $NBQUEUE_URL: see ``WorkerProcesses(env=...)`` and ``worker_env``.
    cmd = [sys.executable, "-m", "nbqueue", "worker", "-p", "1"]
    if lease_seconds is not None:
        cmd += ["--lease", str(lease_seconds)]
    if burst:
        cmd.append("--burst")
    if max_tasks is not None:
        cmd += ["--max-tasks", str(max_tasks)]
    if max_attempts is not None:
        cmd += ["--max-attempts", str(max_attempts)]
    if idle_exit is not None:
        cmd += ["--idle-exit", str(idle_exit)]
    if insecure:
        cmd.append("--insecure")
    if only_by_reference:
        cmd.append("--only-by-reference")
    if renewal is not None:
        cmd += ["--renew", renewal]
    if concurrency != 1:
        cmd += ["--concurrency", str(concurrency)]
    if task_timeout is not None:
        cmd += ["--task-timeout", str(task_timeout)]
    if echo_output:
        cmd.append("--echo-output")
    return cmd


# -- a local process pool (LocalTaskQueue) ---------------------------------------------------------
_child_codec: TaskCodec | None = None
_child_functions: dict[str, bytes] = {}


def _child_init(insecure: bool, serializer: str, queue_id: str, functions: dict[str, bytes]) -> None:
    global _child_codec, _child_functions
    _child_codec = TaskCodec(Signer.default(insecure), get_serializer(serializer), queue_id)
    _child_functions = functions
    echo_to_terminal(True)  # a local pool runs in the caller's own terminal, as python-task-queue's


def _child_execute(lease: Lease, max_attempts: int) -> Outcome:
    assert _child_codec is not None, "the pool initializer sets the codec"
    return execute(_child_codec, lease, _child_functions.__getitem__, max_attempts, worker_id())


def run_in_processes(queue: QueueConnection, parallel: int, max_attempts: int) -> None:
    """Run every task of ``queue`` in ``parallel`` spawned processes until none is left.

    The tasks stay in this process's storage (a mem:// queue): leases, retries and the
    completion store work as on any queue, and the children only execute.
    """
    backend = queue.backend
    # Function blobs go to each child once, not with every task.
    functions = dict(backend.iter_functions())
    init = (queue.insecure, queue.serializer.name, queue.queue_id, functions)
    with spawn_pool(parallel, _child_init, init) as pool:
        while True:
            leases = backend.lease(parallel * 8, 3600, wait=0.5)
            if not leases:
                if backend.counts().waiting <= 0:
                    return
                continue  # retries are waiting out their backoff
            outcomes = list(pool.map(_child_execute, leases, [max_attempts] * len(leases)))
            backend.complete([(o.lease.task_id, o.lease.token, o.record) for o in outcomes if o.ok])
            for o in outcomes:
                if not o.ok:
                    backend.fail(o.lease.task_id, o.lease.token, o.record, o.retry_in)
