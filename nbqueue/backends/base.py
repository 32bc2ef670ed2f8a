"""The storage contract: bytes in, bytes out.

A backend stores task payloads, leases, results, job records and function blobs as opaque
bytes. It never unpickles anything and never checks signatures: that happens one layer up
(`serialize.py`). Every verb below is atomic per call unless said otherwise, and every verb
that changes a task's state is fenced by the lease token: a stale token changes nothing.

Task ids are ``"<job_id>-<index>"``; a backend may rely on that to find a task's job
(`job_of`). Task and job ids use only ``[A-Za-z0-9_-]``. Ids are never reused: the queue layer
makes a new job id for every insert, and a backend refuses a batch that repeats an id.

Counters: a job's counters keep a purged dead letter as dead (its error record stays with the
job), while the queue's ``dead`` counts only letters still held. Tasks restored by the copying
verbs (``put_results``, ``put_dead``) count as inserted and as completed or dead; ``failed``
counts attempts made in this queue only. ``rezero`` recounts what the
backend still holds; results that have expired (redis:// keeps finished jobs' records for
``result_ttl``) are no longer counted, and a job whose records expired is no longer listed.

One contract test suite (``tests/test_backend_contract.py``) runs unchanged against every
backend; it is the executable form of this docstring.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

from ..errors import QueueIdentityChanged


class TaskStatus(str, enum.Enum):
    """Where a task is in its life: queued → leased → completed, or leased → dead; any state not
    finished → cancelled."""

    QUEUED = "queued"
    LEASED = "leased"
    COMPLETED = "completed"
    DEAD = "dead"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Lease:
    """A task handed to one worker until its deadline.

    ``attempt`` counts leases of this task that were not released, this one included (1 on the
    first run). Only ``token`` may renew, complete, fail or release the task.

    ``suspect`` is set once a lease of the task expired (its worker died, stalled or was cut
    off). Nobody can tell which task of a dead worker's batch killed it, so that first expiry is
    not charged; a suspect then runs alone, and every later expiry is (``charged``).
    """

    task_id: str
    token: str
    attempt: int
    payload: bytes
    suspect: bool = False

    @property
    def charged(self) -> int:
        """Attempts that count against ``max_attempts``, this one included: all but the first
        expiry, which nobody can pin on this task."""
        return self.attempt - int(self.suspect)


@dataclass(frozen=True)
class DeadLetter:
    """A task that will not be retried by itself: its payload and the error that put it here."""

    task_id: str
    attempts: int
    payload: bytes
    error: bytes | None


@dataclass(frozen=True)
class TaskInfo:
    """Where one task is, for inspection.

    ``attempts`` counts leases that counted so far (0 once completed: the record has it);
    ``payload`` is None once the task completed (only its record is kept); ``expires_in`` is
    the seconds left on a lease (LEASED only; negative when it has passed but was not reclaimed
    yet). A task with a committed record and no dead letter is COMPLETED even when the record is
    an error (a purged dead letter): only the record says whether it succeeded.
    """

    task_id: str
    status: TaskStatus
    attempts: int
    payload: bytes | None
    expires_in: float | None = None


COUNT_FIELDS = ("inserted", "queued", "leased", "completed", "failed", "dead", "cancelled")


@dataclass
class Counts:
    """Queue or job counters.

    ``queued``, ``leased``, ``completed``, ``dead`` and ``cancelled`` are tasks in that state
    now; ``inserted``
    counts tasks ever inserted and ``failed`` counts failed attempts (retried or not).
    ``scheduled`` tasks wait in the queue but are not ready yet: inserted with a delay, or a
    retry waiting out its backoff (``queued`` counts the ready ones only). The stored counters
    are ``COUNT_FIELDS``; ``scheduled`` is read from the queue's structures.
    """

    inserted: int = 0
    queued: int = 0
    leased: int = 0
    completed: int = 0
    failed: int = 0
    dead: int = 0
    cancelled: int = 0
    scheduled: int = 0

    @property
    def waiting(self) -> int:
        """Tasks in the queue that no worker holds: ready (queued) or not yet (scheduled)."""
        return self.queued + self.scheduled

    @property
    def finished(self) -> int:
        """Tasks that will not run again by themselves: completed, dead or cancelled."""
        return self.completed + self.dead + self.cancelled

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def identity_changed(fenced: str, current: str | None) -> QueueIdentityChanged:
    """The error of an insert fenced with ``fenced`` into a queue whose identity is ``current``."""
    now = "has none yet" if current is None else f"is {current!r}"
    return QueueIdentityChanged(
        f"the queue's identity changed: the tasks are signed for {fenced!r} and the queue's {now} "
        "(it was purged, or its storage lost its data); nothing was written",
        current,
    )


class CommitWatch(ABC):
    """Waits for a job's commits (``Backend.watch_commits``): on redis:// a blocking read of the
    job's commit log, on fq:// a file system notification (or a short poll where there is none),
    on mem:// a condition variable."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until a task of the job commits (since the last ``wait`` returned True), or
        ``timeout`` seconds pass; True if something did, or may have: a storage that can only
        poll says True after a short pause, so callers always re-read what they wait for. The
        first wait returns True at once if the job had commits before the watch began, so a
        waiter need not look before it (one read saved on every round trip)."""

    #: The storage's ``Backend.record``, which ``wait_then_read`` calls after the wait.
    read_record: Callable[[str], bytes | None]

    def wait_then_read(self, task_id: str, timeout: float) -> tuple[bool, bytes | None]:
        """``wait(timeout)``, then the task's record if it has one (``Backend.record``): what one
        task's waiter does. redis:// sends both in one round trip."""
        woke = self.wait(timeout)
        return woke, self.read_record(task_id)

    #: The storage's ``Backend.job_counts`` of the watched job, which ``wait_then_counts`` calls.
    read_counts: Callable[[], Counts]

    def wait_then_counts(self, timeout: float) -> tuple[bool, Counts]:
        """``wait(timeout)``, then the job's counters: what a job's waiter does. redis:// sends
        both in one round trip."""
        woke = self.wait(timeout)
        return woke, self.read_counts()

    def close(self) -> None:  # noqa: B027 - optional hook: only a file system watch holds anything
        """Release what the watch holds."""

    def __enter__(self) -> CommitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """Abstract storage. Subclasses register a URL scheme in ``nbqueue.backends``."""

    #: URL this backend was opened with, safe to show (no password).
    url: str
    #: True when ``lease(wait=...)`` waits on a notification; False when it would only poll, so
    #: a worker does its own idle backoff instead.
    blocking_lease: bool = False
    #: True when a job's counters change in the same atomic step as its records, so its
    #: ``finished`` count says exactly when it ended. fq:// writes them just after a commit (and a
    #: process killed in between never does): a waiter there counts the records to be sure.
    counts_exact: bool = False

    # -- function blobs: stored once per job, keyed by the SHA-256 of their bytes ---------------
    @abstractmethod
    def put_function(self, digest: str, blob: bytes) -> None:
        """Store a function blob under its digest; storing the same digest twice is a no-op."""

    @abstractmethod
    def get_function(self, digest: str) -> bytes:
        """Return the blob stored under ``digest``; raise KeyError if there is none."""

    # -- job records ----------------------------------------------------------------------------
    @abstractmethod
    def put_job(self, job_id: str, meta: bytes) -> None:
        """Create or replace a job's record."""

    @abstractmethod
    def get_job(self, job_id: str) -> bytes | None:
        """A job's record, or None if unknown."""

    @abstractmethod
    def list_jobs(self) -> list[str]:
        """Ids of the jobs this queue knows, oldest first."""

    # -- tasks ----------------------------------------------------------------------------------
    @abstractmethod
    def insert(
        self,
        job_id: str,
        tasks: Sequence[tuple[str, bytes]],
        delay: float = 0.0,
        priority: int = 0,
        record: bytes | None = None,
        queue_id: str | None = None,
    ) -> None:
        """Queue many tasks of one job in one call: all of them become visible, or none.

        With ``record``, the job's record is stored too (as ``put_job``): in the same atomic
        step on redis:// and mem://, right after the tasks on fq:// (a crash in between leaves
        tasks without a record, never a record promising tasks that are not there). A job that
        is one batch is inserted this way in one call.

        With ``delay`` (seconds) they are queued but not ready until then, like a retry waiting
        out its backoff (the storage's clock decides when: the server's, on a network backend).
        A job's ``priority`` is the one its first insert gives (every insert of a job passes the
        same): see ``lease``.

        With ``queue_id`` (the identity the tasks are signed for, see ``queue_id()``), nothing is
        written unless that is the queue's identity now, and ``QueueIdentityChanged`` says which
        it is: tasks signed for one identity never land in a queue that has another. Checked in
        the same atomic step on redis:// and mem://, just before writing on fq://. A producer
        that keeps the identity it read last needs no read of it before each insert.
        """

    @abstractmethod
    def lease(self, n: int, seconds: float, wait: float = 0.0) -> list[Lease]:
        """Lease up to ``n`` ready tasks for ``seconds``.

        Jobs take turns: the tasks come from the job with the highest priority whose turn it is
        (the one served least recently), then the next, so a small job queued behind a big one
        starts at once instead of after it. Within a job, tasks go in insertion order, roughly.

        Expired leases are returned to the queue first (no daemon needed). With ``wait`` > 0
        the call may block up to that long for work to arrive.
        """

    @abstractmethod
    def renew(self, task_id: str, token: str, seconds: float) -> bool:
        """Push the lease deadline to now + ``seconds``; False if the token is no longer current."""

    @abstractmethod
    def complete(self, items: Sequence[tuple[str, str, bytes]]) -> list[bool]:
        """Commit results ``(task_id, token, result)``; one bool per item, False for stale tokens.

        Exactly one result is ever committed per task.
        """

    @abstractmethod
    def fail(self, task_id: str, token: str, error: bytes, retry_in: float | None) -> TaskStatus | None:
        """Record a failed attempt.

        With ``retry_in`` the task is queued again, ready after that many seconds (QUEUED);
        with None it goes to the dead letters with ``error`` as its record (DEAD). A task marked
        cancelled ends CANCELLED either way (with the cancel's record; no failed attempt counts).
        Returns None and changes nothing when the token is stale.
        """

    @abstractmethod
    def release(self, task_id: str, token: str) -> bool:
        """Give an unstarted task back to the queue; the attempt does not count."""

    # -- cancelling -----------------------------------------------------------------------------
    @abstractmethod
    def cancel(self, job_id: str, record: bytes, task_ids: Sequence[str] | None = None) -> int:
        """Cancel a job (every task of it, with ``task_ids`` None) or the named tasks of it, for
        good; returns how many tasks ended cancelled now.

        A waiting task (queued or scheduled) ends CANCELLED at once, with ``record`` as its record
        (among the job's ``results``). A leased task is marked: ``cancel_requested`` names it,
        and when its lease comes back (``fail``, ``release`` or expiry) it ends CANCELLED with
        ``record`` instead of being queued again. ``lease`` never hands out a marked task. A
        completed or dead task stays as it is. The marks are kept in the storage, so every worker
        on every machine sees them.
        """

    @abstractmethod
    def cancel_requested(self, task_ids: Sequence[str]) -> set[str]:
        """Which of these tasks (a worker's leases) are marked cancelled: one cheap call."""

    # -- running failed tasks again -------------------------------------------------------------
    @abstractmethod
    def failed_payloads(self, job_id: str) -> dict[str, bytes]:
        """The payloads of a job's tasks that ended without a value and can run again: its dead
        letters (not purged) and its cancelled tasks (a cancelled task keeps its payload)."""

    @abstractmethod
    def retry(self, job_id: str, tasks: Sequence[tuple[str, bytes]]) -> int:
        """Queue again, under their own ids, tasks of the job that are in ``failed_payloads``,
        each with a new ``payload`` and a fresh attempt count; returns how many.

        Their records, dead letters and cancel marks go, and so does the job's own cancel mark
        (retrying a cancelled job lifts its cancel): the tasks count as queued again, not dead
        or cancelled. Refuses (ValueError, nothing changed) a task not in ``failed_payloads``.
        """

    # -- reads ----------------------------------------------------------------------------------
    @abstractmethod
    def counts(self) -> Counts:
        """Queue counters, O(1) in the number of tasks (``scheduled``: in the number of tasks
        waiting for a later time, on redis:// and mem://)."""

    @abstractmethod
    def job_counts(self, job_id: str) -> Counts:
        """One job's counters, as ``counts``."""

    @abstractmethod
    def results(self, job_id: str) -> dict[str, bytes]:
        """Committed result records of a job (completed tasks, and dead ones' error records)."""

    @abstractmethod
    def record(self, task_id: str) -> bytes | None:
        """One task's committed record (as in ``results``), or None while it has none."""

    def exact_job_finished(self, job_id: str) -> int:
        """Finished tasks of a job counted from the records themselves, not counters.

        Backends whose counters can drift (a process killed between two writes) override this
        with a direct count; ``Job.wait`` uses it to confirm the end of a job.
        """
        return len(self.results(job_id))

    # -- watching: a job's commit log -----------------------------------------------------------
    # Every record a task of a job commits (a value, a dead letter's error, a cancel) is also
    # noted in the job's commit log, so that a waiter is woken by the commit instead of polling,
    # and a reader can take only what is new since it last looked.
    @abstractmethod
    def watch_commits(self, job_id: str) -> CommitWatch:
        """A watch on the job's commits from now on (see ``CommitWatch``); close it when done."""

    def primed_watch(self, job_id: str, task_id: str) -> CommitWatch | None:
        """A watch on the job whose first ``wait_then_read(task_id, ...)`` is already on its way,
        asked before the task is even inserted: the answer comes back the moment the task commits,
        while the caller still waits for its insert to be acknowledged. None where a wait cannot
        start early (the storage's own ``watch_commits`` is as quick there) or none is free now."""
        return None

    @abstractmethod
    def read_commits(
        self, job_id: str, cursor: object | None, limit: int
    ) -> tuple[list[tuple[str, bytes]], object]:
        """About ``limit`` records ``(task_id, record)`` committed since ``cursor`` was returned
        (None: since the job began), and the cursor to read on from (opaque, of this backend).
        Fewer than ``limit`` only when there is nothing more to read now (on fq://: in this pass
        over the directory; the next call starts another); more only by the rest of one group
        (redis:// logs the commits of one call together, up to 256).

        Each commit is returned once along a chain of cursors; a task run again (``retry``,
        ``redrive``) is returned again when it commits again. Records are in commit order where
        the storage keeps one (redis://, mem://); fq:// returns them in directory order. Memory
        stays flat in the size of the job: a cursor holds at most a bit per task.
        """

    # -- admin ----------------------------------------------------------------------------------
    @abstractmethod
    def release_all(self, force: bool = False) -> int:
        """Return expired leases (every lease with ``force``) to the queue; how many moved.

        An expired lease keeps its attempt (its worker died or stalled) and makes the task a
        suspect (``Lease.suspect``). A live lease taken back by ``force`` is a release, not a
        crash: its attempt is given back, as ``release`` does, and it makes no suspect.
        """

    @abstractmethod
    def purge(self) -> None:
        """Delete everything: tasks, leases, dead letters, results, jobs, functions, counters.

        The queue gets a new ``queue_id``: nothing signed for the old one runs here again.
        """

    @abstractmethod
    def queue_id(self) -> str:
        """The identity of what this queue holds: random, made on first use (created here if
        missing) and again after ``purge``.

        Task envelopes are signed for it, so a task copied into another queue is refused. A
        storage that lost everything (a Redis server restarted without persistence, a flushed
        database) comes back with a new id: that is how a waiting job notices its tasks are gone.
        """

    @abstractmethod
    def rezero(self) -> Counts:
        """Reset the event counters (inserted, failed) and recount the state counters exactly."""

    @abstractmethod
    def dead(self) -> list[DeadLetter]:
        """The dead letters."""

    @abstractmethod
    def redrive(self, task_ids: Sequence[str] | None = None) -> int:
        """Queue dead letters again (all, or those named) with a fresh attempt count."""

    @abstractmethod
    def purge_dead(self, task_ids: Sequence[str] | None = None) -> int:
        """Delete dead letters (all, or those named)."""

    # -- inspection -----------------------------------------------------------------------------
    @abstractmethod
    def peek_queued(self, n: int) -> list[tuple[str, bytes]]:
        """Up to ``n`` ready tasks as ``(task_id, payload)``, in the order a lease would take
        them, without leasing them (delayed retries are not ready)."""

    @abstractmethod
    def lease_deadlines(self, limit: int) -> list[tuple[str, float]]:
        """The ``limit`` leases that expire first as ``(task_id, seconds left)``, soonest first.

        Seconds are measured on the clock that sets the deadlines (the server's on redis://), so
        callers need no clock of their own; negative when a deadline passed and the lease was
        not reclaimed yet.
        """

    @abstractmethod
    def find_task(self, task_id: str) -> TaskInfo | None:
        """Where a task is, or None if the queue does not know it. An admin verb: it may scan
        the tasks of the task's job."""

    # -- workers --------------------------------------------------------------------------------
    @abstractmethod
    def heartbeat(self, worker_id: str, info: bytes, ttl: float) -> None:
        """Record that a worker is alive for the next ``ttl`` seconds, with ``info`` about it;
        ``ttl <= 0`` withdraws the worker at once."""

    @abstractmethod
    def workers(self) -> dict[str, bytes]:
        """``worker_id -> info`` of every worker whose last heartbeat has not expired."""

    @abstractmethod
    def add_job_worker(self, job_id: str, worker_id: str) -> None:
        """Note that worker ``worker_id`` ran a task of the job (a worker says so once per job it
        serves, not per task); kept, and expired or purged, with the job's results."""

    @abstractmethod
    def job_workers(self, job_id: str) -> set[str]:
        """The workers that ran tasks of the job (``add_job_worker``), alive or not."""

    # -- copying between queues -----------------------------------------------------------------
    @abstractmethod
    def iter_queued(self) -> Iterator[tuple[str, bytes]]:
        """Every queued task as ``(task_id, payload)``, for copying between queues."""

    @abstractmethod
    def iter_leased(self) -> Iterator[tuple[str, bytes]]:
        """Every leased task as ``(task_id, payload)`` (``cp --force`` copies them as queued)."""

    @abstractmethod
    def iter_functions(self) -> Iterator[tuple[str, bytes]]:
        """Every stored function blob as ``(digest, blob)``."""

    @abstractmethod
    def put_results(self, job_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        """Store the committed records ``(task_id, record)`` of tasks that ran elsewhere.

        Each counts as inserted and completed. Refuses (ValueError, nothing written) ids of
        another job, repeats, and a task that already has a record.
        """

    @abstractmethod
    def put_dead(self, job_id: str, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters of tasks that failed elsewhere, with their payload, attempts and
        error record (which joins the job's results, as ``fail`` puts it).

        Each counts as inserted and dead. Refuses (ValueError, nothing written) ids of another
        job, repeats, letters without an error record, and a task that already has a record.
        """

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to close
        """Release connections and flush anything buffered."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
