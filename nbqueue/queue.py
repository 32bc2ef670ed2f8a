"""``TaskQueue``: the one object a user holds. Opens a backend by URL and offers insert, workers,
jobs, status and the admin verbs; ``LocalTaskQueue`` runs tasks in local processes at once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from . import defaults
from .backends.base import Counts, DeadLetter
from .connection import QueueConnection
from .errors import QueueURLError
from .insert import insert_tasks
from .jobs import Job
from .procs import WorkerProcesses
from .worker import Worker, WorkerStats, run_in_processes, worker_command, worker_env


class TaskQueue(QueueConnection):
    """A queue reached by URL: ``fq://PATH``, ``redis://host:port/db?queue=NAME``, ``mem://NAME``.

    Args:
        url: the queue; defaults to ``$NBQUEUE_URL``. A bare path means fq://.
        insecure: neither sign nor check signatures (only for queues no one else can write).
        serializer: name of the serializer for tasks and results.
    """

    # -- inserting ------------------------------------------------------------------------------
    def insert(
        self,
        tasks: Iterable[Any],
        total: int | None = None,
        *,
        name: str | None = None,
        batch_size: int = defaults.INSERT_BATCH_SIZE,
        progress: bool = True,
        source: str | None = None,
        parallel: int = 1,
        green: bool = False,
        explain: bool = False,
    ) -> Job:
        """Queue every task of ``tasks`` as one job and return the Job.

        ``tasks`` may be any iterable (a generator streams in constant memory) of
        ``partial(fn, ...)`` of ``@queueable`` functions, bare queueable functions, or
        registered-task objects. Each task is checked (queueable, arguments fit the signature,
        serializable) as it is read; a bad one raises before its batch is written.

        Args:
            total: number of tasks, for the progress bar when ``tasks`` has no ``len()``.
            name: a name for the job (defaults to its id).
            batch_size: tasks per storage write.
            progress: show a bar counting uploaded tasks.
            source: text recorded with the job (e.g. a notebook cell).
            parallel: with an iterable that has ``len()`` and slice ``__getitem__`` (a range-like
                task iterator, a list), N spawned processes each build and upload one slice;
                the parent never reads the tasks. With a plain generator, this process encodes
                while N threads write batches through a bounded queue (storage round trips
                overlap the encoding; memory stays bounded).
            green: write batches from gevent greenlets, for network backends. You must run
                ``from gevent import monkey; monkey.patch_all()`` first; nbqueue never patches.
            explain: print one line per job function: what travels by value (with sizes) and
                what by reference (see ``nbqueue.explain``).
        """
        return insert_tasks(
            self,
            tasks,
            total=total,
            name=name,
            batch_size=batch_size,
            progress=progress,
            source=source,
            parallel=parallel,
            green=green,
            explain=explain,
        )

    # -- jobs -----------------------------------------------------------------------------------
    def job(self, job_id: str, *, queue_id: str | None = None) -> Job:
        """Reattach to a job by id (from any process)."""
        return Job.attach(self, job_id, queue_id=queue_id)

    def jobs(self) -> list[Job]:
        """Every job of this queue, oldest first."""
        queue_id = self.queue_id  # once for all of them
        return [self.job(job_id, queue_id=queue_id) for job_id in self.backend.list_jobs()]

    # -- workers --------------------------------------------------------------------------------
    def poll(
        self,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        burst: bool = True,
        max_tasks: int | None = None,
        stop_event: threading.Event | None = None,
        only_by_reference: bool = False,
    ) -> WorkerStats:
        """Run tasks in this process until the queue is empty (``burst``) or ``max_tasks`` ran.

        With ``only_by_reference`` every task that ships pickled code is refused unread (it goes
        to the dead letters); only tasks by reference run.
        """
        worker = Worker(
            self,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            burst=burst,
            max_tasks=max_tasks,
            only_by_reference=only_by_reference,
        )
        if stop_event is not None:
            worker.stop_event = stop_event
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
    ) -> WorkerProcesses:
        """Start ``n`` worker processes on this queue (fresh interpreters, not forks of the kernel).

        They keep running if the kernel restarts; they exit after ``idle_exit`` idle seconds, when
        the queue is empty with ``burst``, or on ``.stop()``. With ``only_by_reference`` they
        refuse every task that ships pickled code.
        """
        if self.url.startswith("mem://"):
            raise QueueURLError("mem:// lives in this process only: use poll(), LocalTaskQueue, or fq://")
        cmd = worker_command(
            lease_seconds=lease_seconds,
            burst=burst,
            max_attempts=max_attempts,
            idle_exit=idle_exit,
            insecure=self.insecure,
            only_by_reference=only_by_reference,
        )
        return WorkerProcesses(cmd, n, restart=False, env=worker_env(self.worker_url))

    # -- status and admin -----------------------------------------------------------------------
    def status(self) -> Counts:
        """inserted / queued / leased / completed / failed / dead, read in O(1)."""
        return self.backend.counts()

    @property
    def inserted(self) -> int:
        return self.status().inserted

    @property
    def enqueued(self) -> int:
        """Tasks waiting to run (python-task-queue's name)."""
        return self.status().queued

    @property
    def leased(self) -> int:
        return self.status().leased

    @property
    def completed(self) -> int:
        return self.status().completed

    def release_all(self, force: bool = False) -> int:
        """Return expired leases to the queue (every lease with ``force``)."""
        return self.backend.release_all(force=force)

    def rezero(self) -> Counts:
        """Reset the inserted/failed counters and recount the rest exactly."""
        return self.backend.rezero()

    def purge(self) -> None:
        """Delete everything in the queue: tasks, leases, results, jobs, dead letters."""
        self.backend.purge()

    def dead(self) -> list[DeadLetter]:
        """Tasks that failed for good."""
        return self.backend.dead()

    def redrive(self, task_ids: Sequence[str] | None = None) -> int:
        """Queue dead letters again with a fresh attempt count."""
        return self.backend.redrive(task_ids)

    def purge_dead(self, task_ids: Sequence[str] | None = None) -> int:
        """Delete dead letters."""
        return self.backend.purge_dead(task_ids)

    def __repr__(self) -> str:
        return f"TaskQueue({self.url!r})"


class LocalTaskQueue(TaskQueue):
    """Runs inserted tasks at once, in ``parallel`` local processes (0 or 1: in this process).

    Uses the same envelopes, leases, retries and completion store as any queue (an in-process
    mem:// one), so a task behaves here as it will on remote workers.
    """

    def __init__(
        self, parallel: int = 1, *, max_attempts: int = defaults.MAX_ATTEMPTS, progress: bool = True
    ) -> None:
        super().__init__(f"mem://local-{uuid.uuid4().hex}")
        self.parallel = parallel
        self.max_attempts = max_attempts
        self.progress = progress

    def insert(self, tasks: Iterable[Any], total: int | None = None, **kwargs: Any) -> Job:
        """Insert, run every task, and return the finished Job."""
        kwargs.setdefault("progress", self.progress)
        job = super().insert(tasks, total, **kwargs)
        if self.parallel <= 1:
            self.poll(max_attempts=self.max_attempts, lease_seconds=3600)
        else:
            run_in_processes(self, self.parallel, self.max_attempts)
        return job
