"""Jobs: the tasks of one insert, read back as counts, results and errors.

A job outlives the process that made it: ``TaskQueue.job(id)`` reattaches from anywhere.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from . import defaults
from .backends.base import Counts, index_of
from .errors import BackendUnavailable, QueueStateLost, TaskFailed
from .progress import JobBar, JobView, describe, progress_mode
from .records import TaskError, TaskRecord, open_record
from .worker import pid_alive

if TYPE_CHECKING:
    from .queue import TaskQueue

#: Seconds of unchanged counters after which wait() confirms the end by an exact count.
_STALL_CHECK_SECONDS = 5.0


def _process_gone(producer: dict | None) -> bool:
    """True when the process that was inserting ran on this host and is gone."""
    if not producer or producer.get("host") != socket.gethostname():
        return False
    try:
        return not pid_alive(int(producer["pid"]))
    except (KeyError, ValueError, TypeError):
        return False


class Job:
    """The tasks of one ``insert()``: progress, results in insertion order, errors."""

    def __init__(
        self, queue: TaskQueue, job_id: str, meta: dict | None = None, *, queue_id: str | None = None
    ) -> None:
        self.queue = queue
        self.id = job_id
        self._meta = meta
        self._view: JobView | None = None
        # What the queue held when this job was made or found; a new identity means it is gone.
        self._queue_id = queue.queue_id if queue_id is None else queue_id

    # -- record -----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """The job record (re-read while the job is still being inserted)."""
        if self._meta is None or self._meta.get("state") == "inserting":
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
    def total(self) -> int | None:
        """Tasks in the job; None while an insert is still streaming them."""
        meta = self.meta
        if meta.get("state") == "inserting":
            if _process_gone(meta.get("producer")):
                return self.counts().inserted
            return None
        return meta.get("total")

    def counts(self) -> Counts:
        """The job's counters (O(1))."""
        return self.queue.backend.job_counts(self.id)

    def check_queue(self) -> None:
        """Raise QueueStateLost if the queue's storage no longer holds this job's state."""
        if self.queue.backend.queue_id() != self._queue_id:
            raise QueueStateLost(
                f"the queue's state vanished: {self.queue.url} no longer holds job {self.name} "
                "(its storage lost its data, e.g. a Redis server restarted without persistence, "
                "or the queue was purged); insert the job again"
            )

    def done(self) -> bool:
        """True when every task completed or is dead."""
        total = self.total
        return total is not None and self.counts().finished >= total

    # -- display ----------------------------------------------------------------------------
    @property
    def view(self) -> JobView:
        """The job's progress view (one per Job object)."""
        if self._view is None:
            self._view = JobView(self)
        return self._view

    def latest_error(self) -> TaskError | None:
        """The most recently failed task's error, from the dead letters (not a scan of results)."""
        from .report import dead_letters

        rows = dead_letters(self.queue, self.id, limit=1)
        if not rows:
            return None
        r = rows[0]
        return TaskError(r["task_id"], r["type"], r["message"], r["traceback"], r["attempts"], r["worker"])

    def workers_seen(self) -> int | None:
        """Workers the queue has heard from recently (None when the storage cannot say now)."""
        try:
            return len(self.queue.backend.workers())
        except Exception:
            return None

    def _ipython_display_(self) -> None:
        """In a notebook: the live widget (or its text where widgets are off)."""
        if progress_mode() == "widget":
            self.view.show()
        else:
            from IPython.display import display

            display({"text/plain": self.view.refresh_text()}, raw=True)

    # -- waiting ----------------------------------------------------------------------------
    def wait(
        self, timeout: float | None = None, progress: bool = True, check: Callable[[], None] | None = None
    ) -> Job:
        """Block until every task is finished (completed or dead), showing progress.

        Args:
            timeout: give up after this many seconds.
            progress: show the widget (in a notebook) or a text bar.
            check: called at every poll; raise from it to stop waiting (e.g. workers died).

        Rides out a storage outage of up to ``defaults.WAIT_OUTAGE_SECONDS`` (a server restart).

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            QueueStateLost: the queue lost this job's state (its tasks will never finish).
            BackendUnavailable: the storage stayed unreachable too long.
        """
        if progress and progress_mode() == "widget":
            return self._wait_with_widget(timeout, check)
        start = time.monotonic()
        bar = JobBar(self.total, f"job {self.name}", enabled=progress)
        sleep = defaults.WAIT_POLL_MIN
        last_finished, last_change = -1, start
        last_identity_check, outage_since = start, None
        try:
            while True:
                try:
                    total = self.total
                    counts = self.counts()
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
                    time.sleep(defaults.WAIT_POLL_MAX)
                    continue
                bar.show(counts, total)
                if check is not None:
                    check()
                if counts.finished != last_finished:
                    last_finished, last_change = counts.finished, time.monotonic()
                    sleep = defaults.WAIT_POLL_MIN
                if total is not None and (
                    counts.finished >= total or time.monotonic() - last_change > _STALL_CHECK_SECONDS
                ):
                    # Counters can lag a killed process: the records themselves decide.
                    if self.queue.backend.exact_job_finished(self.id) >= total:
                        return self
                    last_change = time.monotonic()
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(
                        f"job {self.name} not finished after {timeout:g}s: {describe(counts, total)}"
                    )
                time.sleep(sleep)
                sleep = min(sleep * 1.5, defaults.WAIT_POLL_MAX)
        finally:
            bar.close()

    def _wait_with_widget(self, timeout: float | None, check: Callable[[], None] | None) -> Job:
        """Wait while redrawing the widget from this (the cell's) thread; end on the final state."""
        view = self.view
        if view._handle is None:
            view.show()

        def poll() -> None:
            view.refresh()
            if check is not None:
                check()

        try:
            return self.wait(timeout=timeout, progress=False, check=poll)
        finally:
            view.finish()

    # -- results ----------------------------------------------------------------------------
    def records(self) -> list[TaskRecord]:
        """Every committed record, in insertion order (unfinished tasks are absent)."""
        q = self.queue
        raw = q.backend.results(self.id)
        ordered = sorted(raw.items(), key=lambda item: index_of(item[0]))
        return [open_record(q.signer, q.serializer, task_id, blob, self.id) for task_id, blob in ordered]

    def results(self, on_error: Literal["raise", "none", "exception"] = "raise") -> list[Any]:
        """Task values in insertion order.

        Args:
            on_error: ``"raise"`` raises TaskFailed if any task failed for good; ``"none"``
                puts None in its place; ``"exception"`` puts its TaskError there.

        Raises:
            RuntimeError: some tasks are not finished yet (call ``wait()`` first).
            TaskFailed: tasks failed and ``on_error="raise"``.
        """
        records = self.records()
        total = self.total
        if total is None or len(records) < total:
            raise RuntimeError(
                f"job {self.name} is not finished ({len(records)}/{total} tasks); call wait() first"
            )
        errors = [r.error for r in records if not r.ok]
        if errors and on_error == "raise":
            raise TaskFailed(f"{len(errors)} of {total} tasks failed; first: {errors[0]}", errors)
        if on_error == "exception":
            return [r.value if r.ok else r.error for r in records]
        return [r.value if r.ok else None for r in records]

    def errors(self) -> list[TaskError]:
        """The tasks that failed for good, with type, message, traceback and attempts."""
        return [r.error for r in self.records() if not r.ok and r.error is not None]

    def __repr__(self) -> str:
        return f"<Job {self.name} {describe(self.counts(), self.total)} on {self.queue.url}>"
