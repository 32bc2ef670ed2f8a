"""``@queueable``, and single tasks: ``fn.submit(...)`` gives a ``TaskHandle``, ``fn.map(items)``
a ``Job``.

Both use the process's default queue: the one set by ``nbqueue.use(URL)``, else one opened from
``$NBQUEUE_URL`` on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar, overload

from . import defaults
from .backends.base import CommitWatch, TaskStatus
from .errors import QueueURLError, TaskFailed
from .ids import check_id, job_of, task_id
from .jobs import CommitWaiter, Job
from .pickling import fixed
from .queue import TaskQueue
from .records import TaskRecord, open_record
from .tasks import callable_name, mark, signature_of

F = TypeVar("F", bound=Callable[..., Any])

_default: TaskQueue | None = None
_default_lock = threading.Lock()


def use(queue: str | TaskQueue, *, insecure: bool = False) -> TaskQueue:
    """Make ``queue`` (a URL or a TaskQueue) the default of ``submit`` and ``map``; return it."""
    global _default
    tq = queue if isinstance(queue, TaskQueue) else TaskQueue(queue, insecure=insecure)
    with _default_lock:
        _default = tq
    return tq


def default_queue() -> TaskQueue:
    """The queue set by ``use``, else one opened from ``$NBQUEUE_URL`` (once).

    Raises:
        QueueURLError: neither is set.
    """
    global _default
    with _default_lock:
        if _default is None:
            url = os.environ.get(defaults.ENV_URL)
            if not url:
                raise QueueURLError(
                    f"no queue to submit to: call nbqueue.use(URL) or set ${defaults.ENV_URL}"
                )
            _default = TaskQueue(url)
        return _default


@overload
def queueable(fn: F, *, by_reference: bool = False, timeout: float | None = None) -> F: ...


@overload
def queueable(
    fn: None = None, *, by_reference: bool = False, timeout: float | None = None
) -> Callable[[F], F]: ...


def queueable(fn: Any = None, *, by_reference: bool = False, timeout: float | None = None) -> Any:
    """Mark a function (or a class whose instances have ``execute()``) as allowed on the queue.

    Workers run only queueable code. Functions defined in a notebook, closures and lambdas are
    shipped by value, with the notebook globals they use. Use bare (``@queueable``) or with
    options (``@queueable(by_reference=True)``).

    A queueable function gains ``fn.submit(*args, **kwargs)`` (one task, a ``TaskHandle``),
    ``fn.submit_later(when, *args, **kwargs)`` (the same, ready in ``when`` seconds or at a
    ``datetime``) and ``fn.map(iterable, **insert_options)`` (a task per item, a ``Job``), on
    the queue set by ``nbqueue.use``. ``fn.submit(..., timeout=S)`` sets the task's time limit
    unless the function takes a ``timeout`` argument itself; every other keyword is the
    function's. For insert options on one call: ``fn.options(timeout=..., priority=...).submit(...)``.

    Args:
        by_reference: ship no code: tasks name the function as ``module:qualname`` and carry
            JSON arguments (see ``nbqueue.reference``), so the function must be importable
            on the workers. For production pipelines whose workers run only installed code.
        timeout: seconds a task of this function may run; past it the worker raises
            ``nbqueue.TaskTimeout`` inside it (a failed attempt, retried as any other) and kills
            its process if it does not stop within the grace period. A job's ``timeout``
            (``insert(timeout=)``) overrides it; ``nbqueue worker --task-timeout`` applies to
            functions without one.
    """
    if fn is None:
        return functools.partial(queueable, by_reference=by_reference, timeout=timeout)
    mark(fn, by_reference=by_reference, timeout=timeout)
    if inspect.isfunction(fn):
        # Module-level functions in partials: a function shipped by value carries these as
        # references to nbqueue.handles, never as code.
        fn.submit = fixed(functools.partial(submit, fn))  # type: ignore[attr-defined]
        fn.submit_later = fixed(functools.partial(submit_later, fn))  # type: ignore[attr-defined]
        fn.map = fixed(functools.partial(map_tasks, fn))  # type: ignore[attr-defined]
        fn.options = fixed(functools.partial(Options, fn))  # type: ignore[attr-defined]
    return fn


class Options:
    """``fn.options(**insert_options)``: ``submit``, ``submit_later`` and ``map`` of ``fn`` with
    options for ``TaskQueue.insert`` (``timeout``, ``priority``, ``name``, ...); every keyword of
    their own calls is the function's."""

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        self.fn, self.options = fn, options

    def submit(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """``fn.submit`` with these options."""
        return _submit_one(self.fn, functools.partial(self.fn, *args, **kwargs), self.options)

    def submit_later(self, when: float | datetime.datetime, *args: Any, **kwargs: Any) -> TaskHandle:
        """``fn.submit_later`` with these options."""
        options = {**self.options, **_timing(when)}
        return _submit_one(self.fn, functools.partial(self.fn, *args, **kwargs), options)

    def map(self, iterable: Iterable[Any], **options: Any) -> Job:
        """``fn.map`` with these options (and ``options``, which win)."""
        return map_tasks(self.fn, iterable, **{**self.options, **options})


def _timing(when: float | datetime.datetime) -> dict[str, Any]:
    return {"eta": when} if isinstance(when, datetime.datetime) else {"delay": when}


def _submit_one(fn: Callable[..., Any], task: functools.partial, options: dict[str, Any]) -> TaskHandle:
    """Insert one task as a job of its own on the default queue; its handle."""
    tq = default_queue()
    job = tq.insert([task], **{"name": callable_name(fn), "progress": False, **options})
    return TaskHandle(tq, task_id(job.id, 0), watch=job.take_first_task_watch())


def _time_limit_of_call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``timeout=`` taken out of a submit's keywords as the task's time limit, unless ``fn``
    accepts a ``timeout`` argument itself (by name or through ``**kwargs``): an argument the
    function takes is never taken from it."""
    if "timeout" not in kwargs:
        return {}
    try:
        params = signature_of(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.name == "timeout" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {}
    return {"timeout": kwargs.pop("timeout")}


def submit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskHandle:
    """Queue one call ``fn(*args, **kwargs)`` as a job of its own on the default queue.

    ``timeout=S`` is the task's time limit, unless ``fn`` takes a ``timeout`` argument itself
    (then it is ``fn``'s, and ``fn.options(timeout=S).submit(...)`` sets the limit)."""
    options = _time_limit_of_call(fn, kwargs)
    return _submit_one(fn, functools.partial(fn, *args, **kwargs), options)


def submit_later(
    fn: Callable[..., Any], when: float | datetime.datetime, *args: Any, **kwargs: Any
) -> TaskHandle:
    """``submit``, ready only ``when``: seconds from now, or a ``datetime``. (A separate verb:
    every keyword of ``submit`` but ``timeout`` is the function's.)"""
    options = {**_time_limit_of_call(fn, kwargs), **_timing(when)}
    return _submit_one(fn, functools.partial(fn, *args, **kwargs), options)


def map_tasks(fn: Callable[..., Any], iterable: Iterable[Any], **options: Any) -> Job:
    """Queue ``fn(item)`` for every item as one job on the default queue.

    ``options`` go to ``TaskQueue.insert`` (``name``, ``total``, ``progress``, ...).
    """
    options.setdefault("name", callable_name(fn))
    if "total" not in options and hasattr(iterable, "__len__"):
        options["total"] = len(iterable)  # type: ignore[arg-type]
    return default_queue().insert((functools.partial(fn, item) for item in iterable), **options)


class TaskHandle:
    """One queued task, reattachable from any process by queue and task id."""

    def __init__(self, queue: TaskQueue, task: str, *, watch: CommitWatch | None = None) -> None:
        """``watch``: a watch on the task's job to wait with first, one whose first wait went
        out with the insert (``Backend.primed_watch``); the handle closes it."""
        self.queue = queue
        self.task_id = check_id(task, "task id")
        self.job_id = job_of(task)
        self._finished: bytes = b""  # the task's record, once a wait saw it
        self._watch = watch

    @property
    def job(self) -> Job:
        """The job the task belongs to."""
        return self.queue.job(self.job_id)

    def _blob(self) -> bytes | None:
        return self.queue.backend.record(self.task_id)

    def _open(self, blob: bytes) -> TaskRecord:
        q = self.queue
        return open_record(q.signer, q.serializer, self.task_id, blob, self.job_id)

    @property
    def status(self) -> TaskStatus:
        """QUEUED, LEASED, COMPLETED, DEAD (a failure for good, even once its letter is purged) or
        CANCELLED.

        Raises:
            KeyError: the queue does not know the task.
        """
        info = self.queue.backend.find_task(self.task_id)
        if info is None:
            raise KeyError(f"no task {self.task_id!r} in {self.queue.url}")
        if info.status == TaskStatus.COMPLETED:
            # The backend cannot tell a value from an error record; the signed record can.
            blob = self._blob()
            if blob is not None and not self._open(blob).ok:
                return TaskStatus.DEAD
        return info.status

    def cancel(self) -> bool:
        """Cancel this task alone (see ``Job.cancel``); True if it was waiting and ended now,
        False if it is running (it is told) or had finished (it keeps its outcome)."""
        return self.job.cancel([self.task_id]) > 0

    def ready(self) -> bool:
        """True once the task finished: completed, failed for good, or cancelled."""
        return self._blob() is not None

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value.

        Raises:
            TaskFailed: the task failed for good or was cancelled; ``.errors`` holds its TaskError.
            TimeoutError: ``timeout`` seconds passed first.
            KeyError: the queue does not know the task.
        """
        # The watch starts before the first look, so a commit in between still wakes the wait.
        with CommitWaiter(self._take_watch()) as waiter:
            polls = self._waiting(timeout)
            with contextlib.suppress(StopIteration):
                pause = next(polls)
                while True:
                    pause = polls.send(waiter.wait_then_read(self.task_id, pause))
        return self._value()

    def _take_watch(self) -> CommitWatch:
        """The watch given at submit (once), else a new one."""
        watch, self._watch = self._watch, None
        return watch if watch is not None else self.queue.backend.watch_commits(self.job_id)

    async def get_async(self, timeout: float | None = None) -> Any:
        """``get()`` for ``await`` (IPython and Jupyter run top-level ``await``): the event loop
        runs other work while this waits (in a thread) for the commit. Raises as ``get`` does."""
        with CommitWaiter(self._take_watch()) as waiter:
            polls = self._waiting(timeout)
            with contextlib.suppress(StopIteration):
                pause = next(polls)
                while True:
                    pause = polls.send(await asyncio.to_thread(waiter.wait_then_read, self.task_id, pause))
        return self._value()

    def _waiting(self, timeout: float | None) -> Generator[float, bytes | None, None]:
        """The polls of a wait for this task: yields how long to wait before the next look and is
        sent the task's record (or None) that look found; ends once it finished, its record kept
        for ``_value``. No look before the first wait: a watch's first wait returns at once when
        the job has commits already, so a finished task costs one round trip, as a quick one does."""
        start = time.monotonic()
        sleep = defaults.WAIT_POLL_MIN
        known = False
        blob = None
        while blob is None:
            if timeout is not None and time.monotonic() - start >= timeout:
                raise TimeoutError(f"task {self.task_id} not finished after {timeout:g}s")
            blob = yield sleep
            sleep = min(sleep * 1.5, defaults.WAIT_POLL_MAX)
            if blob is None and not known:
                # Asked once, after the first wait, so a quick task's round trip never pays for
                # this (an admin verb that may scan the job).
                known = self.queue.backend.find_task(self.task_id) is not None or self._blob() is not None
                if not known:
                    raise KeyError(f"no task {self.task_id!r} in {self.queue.url}")
        self._finished = blob

    def _value(self) -> Any:
        """The finished task's value (after ``_waiting``); raises TaskFailed if it failed."""
        blob = self._finished
        record = self._open(blob)
        if not record.ok:
            raise TaskFailed(f"task {self.task_id} failed: {record.error}", [record.error])
        return record.value

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} on {self.queue.url}>"
