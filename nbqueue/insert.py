"""The insert pipeline: any iterable of tasks → signed envelopes → batched backend writes.

Streams in constant memory: one batch of envelopes is held at a time (a few with a pipeline).
Nothing is written before the first batch is complete, so a bad task among the first
``batch_size`` leaves the queue untouched; a failure later leaves a job whose total is exactly
what was queued, and the error says so. (A full storage may refuse that last write of the job's
record too: then the error says so, the job's counters hold the exact number, and the original
error, StorageFull, is the one raised.)

Three ways to upload, chosen by ``parallel`` and ``green``:

- one process, one thread: encode a batch, write it, repeat;
- ``parallel=N`` with an iterable that has ``len()`` and slice ``__getitem__``: N spawned
  processes each build and upload one slice (the parent never holds the tasks);
- ``parallel=N`` with a plain generator: this process encodes while N writer threads upload,
  through a queue of at most N batches, so storage round trips overlap the encoding;
- ``green=True``: the writers are gevent greenlets (the caller must have monkey-patched).
"""

from __future__ import annotations

import contextlib
import json
import queue as queue_module
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass
from typing import Any

from . import defaults, pickling
from .connection import QueueConnection
from .errors import QueueIdentityChanged, SliceContractError
from .ids import new_job_id, task_id
from .jobs import Job, JobState, new_job_record, save_job_record
from .procs import spawn_pool
from .progress import InsertProgress, insert_progress
from .serialize import dumps_checked
from .tasks import TaskCodec, check_timeout, reseal_task, to_call

GREEN_FIX = "from gevent import monkey; monkey.patch_all()"


def sliceable(tasks: Any) -> bool:
    """True for iterables that can be cut into slices without being read (``len`` + slicing)."""
    return hasattr(tasks, "__len__") and hasattr(tasks, "__getitem__") and not isinstance(tasks, (str, bytes))


# -- writing batches ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """When a job's tasks become ready, what priority the job has and how long each of its tasks
    may run: the same for every batch, however late the batch is written (a long insert's last
    batch is not ready later), and in every slice's process (the clock is this machine's)."""

    ready_at: float | None = None  #: ``time.time()`` when ready; None: at once
    priority: int = 0
    timeout: float | None = None  #: seconds per task (in each task's signed header); None: none

    def delay(self) -> float:
        """Seconds from now until the tasks are ready."""
        return 0.0 if self.ready_at is None else max(self.ready_at - time.time(), 0.0)


class _Writer:
    """Writes encoded batches (and a job's new function blobs before its first task), each fenced
    with the queue identity its tasks are signed for (``queue_id``)."""

    #: Does ``submit`` write before it returns (so its errors are the batch's own)?
    synchronous = True

    def __init__(self, backend, job_id: str, placement: Placement, queue_id: str) -> None:
        self.backend = backend
        self.job_id = job_id
        self.placement = placement
        self.queue_id = queue_id
        self.written = 0
        self._lock = threading.Lock()
        #: Digests known to be stored in the queue (``QueueConnection.stored_functions``).
        self.stored: set[str] = set()

    def write(
        self, functions: list[tuple[str, bytes]], batch: list[tuple[str, bytes]], record: bytes | None = None
    ) -> None:
        self._put_functions(functions)
        where = self.placement
        self.backend.insert(
            self.job_id,
            batch,
            delay=where.delay(),
            priority=where.priority,
            record=record,
            queue_id=self.queue_id,
        )
        with self._lock:
            self.written += len(batch)

    def _put_functions(self, functions: list[tuple[str, bytes]]) -> None:
        for digest, blob in functions:
            if digest not in self.stored:
                self.backend.put_function(digest, blob)
                self.stored.add(digest)

    def submit(
        self, functions: list[tuple[str, bytes]], batch: list[tuple[str, bytes]], record: bytes | None = None
    ) -> None:
        """Write a batch (``record``: the job's record, stored with it)."""
        self.write(functions, batch, record)

    def close(self) -> None:
        """Wait for every submitted batch; raise the first write error."""


class _PipelinedWriter(_Writer):
    """Writes from background threads (or greenlets) through a bounded queue of batches."""

    synchronous = False

    def __init__(
        self, backend, job_id: str, placement: Placement, queue_id: str, writers: int, green: bool = False
    ) -> None:
        super().__init__(backend, job_id, placement, queue_id)
        self._queue: queue_module.Queue = queue_module.Queue(maxsize=writers)
        self._error: BaseException | None = None
        if green:
            import gevent

            self._workers = [gevent.spawn(self._drain) for _ in range(writers)]
        else:
            self._workers = [
                threading.Thread(target=self._drain, name="nbqueue-insert", daemon=True)
                for _ in range(writers)
            ]
            for t in self._workers:
                t.start()
        self._green = green

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.write(*item)
                except BaseException as exc:  # reported to the producer at its next submit
                    self._error = exc

    def submit(
        self, functions: list[tuple[str, bytes]], batch: list[tuple[str, bytes]], record: bytes | None = None
    ) -> None:
        if self._error is not None:
            raise self._error
        # Function blobs must land before any task that names them: write them here, in order.
        self._put_functions(functions)
        self._queue.put(([], batch, record))

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        if self._green:
            import gevent

            gevent.joinall(self._workers)
        else:
            for t in self._workers:
                t.join()
        if self._error is not None:
            raise self._error


def upload(
    queue: QueueConnection,
    job_id: str,
    tasks: Iterable[Any],
    offset: int,
    batch_size: int,
    writer: _Writer,
    on_batch: Callable[[int | None], bytes | None] | None = None,
    explain: bool = False,
) -> None:
    """Encode ``tasks`` (ids from ``offset``), signed for ``writer.queue_id``, into batches and
    hand them to ``writer``; with ``explain``, print what each new function ships.

    ``on_batch`` is called before each batch is written, with the number of tasks when that
    batch is the whole job (else None); it returns a job record to store with the batch, or None.

    A first batch refused because the queue's identity changed (``QueueIdentityChanged``: the
    identity ``writer`` was given was read before a purge) is signed again for the identity now
    and written once more; a later batch refused so raises (the job's first tasks are gone).
    """
    codec = TaskCodec(queue.signer, queue.serializer, writer.queue_id)
    writer.stored = queue.stored_functions(writer.queue_id)
    batch: list[tuple[str, bytes]] = []
    batch_bytes = 0
    first = True
    functions: list[tuple[str, bytes]] = []
    for index, task in enumerate(tasks, offset):
        call = to_call(task)
        digest = None
        if call.fn is not None:
            digest, blob, new = codec.function_digest(call.fn)
            if new:
                functions.append((digest, blob))
                if explain:
                    print(pickling.explain(call.fn).summary())
        tid = task_id(job_id, index)
        envelope = codec.encode(tid, job_id, call, digest, writer.placement.timeout)
        batch.append((tid, envelope))
        batch_bytes += len(envelope)
        if len(batch) >= batch_size or batch_bytes >= defaults.INSERT_BATCH_BYTES:
            if on_batch is not None:
                on_batch(None)
            _submit(queue, writer, codec, functions, batch, None, first)
            functions, batch, batch_bytes, first = [], [], 0, False
    if batch or functions:
        record = None
        if on_batch is not None:
            # The first batch is also the last: the whole job, whose record may go with it.
            record = on_batch(len(batch) if first else None)
        _submit(queue, writer, codec, functions, batch, record, first)


def _submit(
    queue: QueueConnection,
    writer: _Writer,
    codec: TaskCodec,
    functions: list[tuple[str, bytes]],
    batch: list[tuple[str, bytes]],
    record: bytes | None,
    first: bool,
) -> None:
    """``writer.submit``; a first batch refused for a changed queue identity (nothing of the job
    was written yet) is sealed for the identity now and submitted again, with every function the
    job uses (the queue's new identity holds none of them)."""
    try:
        writer.submit(functions, batch, record)
    except QueueIdentityChanged:
        if not (first and writer.synchronous):
            raise
        queue_id = queue.queue_id
        batch = [(tid, reseal_task(queue.signer, tid, envelope, queue_id)) for tid, envelope in batch]
        codec.queue_id = writer.queue_id = queue_id
        writer.stored = queue.stored_functions(queue_id)
        writer.submit(codec.functions(), batch, record)


# -- parallel slices ------------------------------------------------------------------------------
def _slice_error(what: str) -> SliceContractError:
    """The one message for a broken slice contract, after ``what`` the slice did."""
    return SliceContractError(
        f"{what}: insert(parallel=N) needs __getitem__(slice) to return exactly the items of the "
        "slice; use parallel=1, or slice properly"
    )


def _exactly(tasks: Iterable[Any], lo: int, hi: int) -> Iterator[Any]:
    """The tasks of slice ``lo:hi``, checked to be exactly ``hi - lo`` of them: never one more
    (its id would be the next slice's), and not fewer (the job's total would never be reached)."""
    count = 0
    for task in tasks:
        if count == hi - lo:
            raise _slice_error(f"tasks[{lo}:{hi}] yielded more than {hi - lo} tasks")
        count += 1
        yield task
    if count != hi - lo:
        raise _slice_error(f"tasks[{lo}:{hi}] yielded {count} tasks, not {hi - lo}")


def _insert_slice(
    reopen: tuple[str, bool, str],
    queue_id: str,
    job_id: str,
    offset: int,
    size: int,
    blob: bytes,
    batch_size: int,
    placement: Placement,
) -> int:
    """Child process: load one slice (``size`` tasks from ``offset``) and upload it. Returns how
    many tasks it queued."""
    queue = QueueConnection.reopen(reopen)
    writer = _Writer(queue.backend, job_id, placement, queue_id)
    try:
        tasks = _exactly(queue.serializer.loads(blob), offset, offset + size)
        upload(queue, job_id, tasks, offset, batch_size, writer)
    finally:
        queue.close()
    return writer.written


def _insert_sliced(
    queue: QueueConnection,
    queue_id: str,
    job_id: str,
    tasks: Any,
    parallel: int,
    batch_size: int,
    bar: Any,
    before_first_batch: Callable[[], None],
    placement: Placement,
) -> int:
    """Cut ``tasks`` into ``parallel`` slices uploaded by as many spawned processes.

    Every slice is cut and serialized here first, and one whose ``len()`` is not its size is
    refused before anything is written; the children check what the slices yield.
    """
    n = len(tasks)
    slices = []
    for lo, hi in ((n * k // parallel, n * (k + 1) // parallel) for k in range(parallel)):
        if hi == lo:
            continue
        part = tasks[lo:hi]
        if hasattr(part, "__len__") and len(part) != hi - lo:
            raise _slice_error(f"len(tasks[{lo}:{hi}]) is {len(part)}, not {hi - lo}; nothing was queued")
        slices.append((lo, hi, dumps_checked(part, queue.serializer, f"slice {lo}:{hi} of the tasks")))
    before_first_batch()  # children write directly: the job must exist first
    with spawn_pool(parallel) as pool:
        futures = [
            pool.submit(
                _insert_slice,
                queue.reopen_args(),
                queue_id,
                job_id,
                lo,
                hi - lo,
                blob,
                batch_size,
                placement,
            )
            for lo, hi, blob in slices
        ]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            bar.set(queue.backend.job_counts(job_id).inserted)
            for future in done:
                future.result()  # a child's exception (or a dead child) surfaces here
    return sum(f.result() for f in futures)


# -- the entry point ------------------------------------------------------------------------------
def insert_tasks(
    queue: QueueConnection,
    tasks: Iterable[Any],
    *,
    total: int | None = None,
    name: str | None = None,
    batch_size: int = defaults.INSERT_BATCH_SIZE,
    progress: bool = True,
    source: str | None = None,
    parallel: int = 1,
    green: bool = False,
    explain: bool = False,
    delay: float = 0.0,
    priority: int = 0,
    timeout: float | None = None,
) -> Job:
    """Insert every task of ``tasks`` as one job; see ``TaskQueue.insert``."""
    placement = Placement(time.time() + delay if delay > 0 else None, priority, check_timeout(timeout))

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    if green:
        _check_green()
    if total is None and hasattr(tasks, "__len__"):
        total = len(tasks)  # type: ignore[arg-type]
    job_id = new_job_id()
    meta = new_job_record(job_id, name, source)
    if priority:
        meta["priority"] = priority
    if placement.timeout is not None:
        meta["timeout"] = placement.timeout
    if placement.ready_at is not None:
        meta["ready_at"] = placement.ready_at  # until then its scheduled tasks are not retries
    # Children cannot see this process's memory: a mem:// queue is written from threads instead.
    # Slices go to processes with green=True too (the children write plainly), as
    # python-task-queue's do.
    sliced = parallel > 1 and sliceable(tasks) and not queue.url.startswith("mem://")
    # The tasks are signed for the queue's identity and every write is fenced with it. One writer
    # in this thread can sign its first batch again if the identity changed since this process
    # read it (a purge), so it saves the read; writers in the background or in other processes
    # get it read now.
    plain = not (green or parallel > 1)
    queue_id = queue.recent_queue_id() if plain else queue.queue_id
    job = Job(queue, job_id, meta, queue_id=queue_id)
    if total == 1 and plain:
        # One task (a submit): its waiter's first read goes out with the insert, in the same
        # write, and is answered the moment the task commits, even while this process still
        # waits for the insert's reply (on two cores, it often gets the CPU only after the
        # worker is done).
        job.first_task_watch = queue.backend.primed_watch(job_id, task_id(job_id, 0))
    # No view is made for an insert that shows nothing (a submit): it is most of a Job's weight.
    bar = insert_progress(job.view, total) if progress else InsertProgress()
    if green and not sliced:
        writer: _Writer = _PipelinedWriter(
            queue.backend, job_id, placement, queue_id, max(parallel, 8), green=True
        )
    elif parallel > 1 and not sliced:
        writer = _PipelinedWriter(queue.backend, job_id, placement, queue_id, parallel)
    else:
        writer = _Writer(queue.backend, job_id, placement, queue_id)
    started = False
    recorded = False  # the final record went with the job's only batch

    def before_first_batch() -> None:
        nonlocal started
        if not started:
            save_job_record(queue, job_id, meta)  # only now: a bad first batch leaves nothing behind
            started = True
        bar.set(writer.written)

    def before_batch(whole_job: int | None) -> bytes | None:
        nonlocal recorded
        if whole_job is None or started:
            before_first_batch()
            return None
        # The job is this one batch: its final record is stored with it, in one call (one round
        # trip for a submitted task). Nothing is written if the batch is refused.
        recorded = True
        return json.dumps({**meta, "total": whole_job, "state": JobState.INSERTED.value}).encode()

    try:
        if sliced:
            queued = _insert_sliced(
                queue,
                queue_id,
                job_id,
                tasks,
                parallel,
                batch_size,
                bar,
                before_first_batch,
                placement,
            )
        else:
            upload(queue, job_id, tasks, 0, batch_size, writer, on_batch=before_batch, explain=explain)
            job.queue_id = writer.queue_id  # the identity its tasks were signed for, re-signed or not
            writer.close()
            queued = writer.written
        if recorded:
            started = True
            meta.update(total=queued, state=JobState.INSERTED.value)
        else:
            if not started:
                before_first_batch()  # an empty job is still a job
            meta.update(total=queued, state=JobState.INSERTED.value)
            save_job_record(queue, job_id, meta)
    except BaseException as exc:
        if not sliced:
            with contextlib.suppress(BaseException):  # the first error is the one to report
                writer.close()
        if started:
            queued = queue.backend.job_counts(job_id).inserted if sliced else writer.written
            error = f"{type(exc).__name__}: {exc}"
            meta.update(total=queued, state=JobState.INSERT_FAILED.value, error=error)
            note = f"nbqueue: {queued} task(s) of job {job_id} were queued before this error; "
            try:
                save_job_record(queue, job_id, meta)
                note += f"the job's total is {queued}."
            except Exception as meta_exc:
                # The first error is the one to raise: a full disk often refuses this write too.
                note += (
                    f"its record could not say so ({type(meta_exc).__name__}: {meta_exc}) and reads "
                    "as still inserting; its counters (job.counts().inserted) are exact."
                )
            if hasattr(exc, "add_note"):
                exc.add_note(note)
        else:
            # Nothing was queued and no record written: the Job object says so, and its view
            # (never shown) has nothing to wait for.
            meta.update(total=0, state=JobState.INSERT_FAILED.value, error=f"{type(exc).__name__}: {exc}")
        bar.fail()
        primed = job.take_first_task_watch()
        if primed is not None:
            primed.close()
        raise
    finally:
        if started:
            bar.set(queue.backend.job_counts(job_id).inserted if sliced else writer.written)
        bar.close()
    return job


def _check_green() -> None:
    """green=True needs gevent and a monkey-patched socket module; nbqueue never patches."""
    try:
        from gevent import monkey
    except ImportError:
        raise ImportError("green=True needs gevent: pip install 'nbqueue[green]'") from None
    if not monkey.is_module_patched("socket"):
        raise RuntimeError(
            "green=True needs the socket module patched by gevent, and nbqueue never patches it "
            f"for you. Run `{GREEN_FIX}` first thing in your program, before other imports. "
            "In IPython/Jupyter the kernel's own event loop does not tolerate patch_all: use "
            "parallel=N there instead, or a script."
        )
