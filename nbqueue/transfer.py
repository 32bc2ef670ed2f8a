"""Copy or move what one queue holds to another, between any two backends (fq://, redis://, mem://).

``copy_queue`` copies function blobs, job records, queued tasks, dead letters and committed
records, keeping every job and task id. Tasks are signed for the queue that holds them, so each
task is verified and signed again for the destination; both queues must use the same signing
key (the same ``NBQUEUE_SECRET``, or the same user's key file).
``move_queue`` copies, then purges the source.

A copy is of a queue at rest: with leases out it is refused, unless ``force``, which copies
each leased task as queued (the running attempt may still commit in the source, and the task
runs again in the destination: at least once, never lost). Stop the workers first. A
destination that already holds one of the source's jobs is refused before anything is written.
Quarantined files of an fq:// queue are not tasks and stay behind.

Counters in the destination: every copied task counts as inserted, and as queued, completed or
dead by its state; ``failed`` (failed attempts) is history and starts at zero there. Queued
tasks start over at attempt 1. A dead letter purged in the source (its error record kept with
the job) is restored and purged again, so the job still counts it as dead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from . import defaults
from .backends.base import Backend, DeadLetter
from .errors import TransferRefused
from .ids import ID_PATTERN, index_of, job_of
from .records import record_header
from .tasks import reseal_task

if TYPE_CHECKING:
    from .queue import TaskQueue


@dataclass
class TransferReport:
    """What a copy wrote to the destination."""

    jobs: int = 0
    functions: int = 0
    queued: int = 0
    leased: int = 0
    completed: int = 0
    dead: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _by_job(
    items: Iterable[Any],
    batch_size: int,
    write: Callable[[str, list], None],
    key: Callable[[Any], str] = lambda item: item[0],
) -> int:
    """Hand ``items`` to ``write(job_id, batch)`` in batches of one job each; how many."""
    pending: dict[str, list] = {}
    n = 0
    for item in items:
        job_id = job_of(key(item))
        batch = pending.setdefault(job_id, [])
        batch.append(item)
        if len(batch) >= batch_size:
            write(job_id, batch)
            n += len(batch)
            pending[job_id] = []
    for job_id, batch in pending.items():
        if batch:
            write(job_id, batch)
            n += len(batch)
    return n


def _check(src: TaskQueue, dst: TaskQueue, force: bool) -> list[str]:
    """Refuse a copy that cannot be faithful; the source's job ids otherwise."""
    if src.url == dst.url:
        raise TransferRefused(f"{src.url} is both the source and the destination")
    if src.backend.lease_deadlines(1) and not force:
        raise TransferRefused(
            f"{src.url} has {src.status().leased} task(s) leased: stop its workers first, "
            "or force the copy to queue leased tasks again in the destination"
        )
    jobs = src.backend.list_jobs()
    clash = next((job_id for job_id in jobs if dst.backend.get_job(job_id) is not None), None)
    if clash is not None:
        raise TransferRefused(f"{dst.url} already has job {clash}: a second copy would duplicate its tasks")
    return jobs


def _copy_records(src: TaskQueue, dst: Backend, job_id: str, skip: set[str], batch_size: int) -> int:
    """Copy a job's committed records (but ``skip``); an error record without a dead letter
    (purged) is restored as a dead letter and purged again. Returns the completed ones."""
    raw = src.backend.results(job_id)
    done, purged = [], []
    for task_id in sorted(raw, key=index_of):
        if task_id in skip:
            continue
        record = record_header(src.signer, task_id, raw[task_id], job_id)
        if record.ok:
            done.append((task_id, raw[task_id]))
        else:
            purged.append(DeadLetter(task_id, record.attempt, b"", raw[task_id]))
    for start in range(0, len(done), batch_size):
        dst.put_results(job_id, done[start : start + batch_size])
    if purged:
        dst.put_dead(job_id, purged)
        dst.purge_dead([letter.task_id for letter in purged])
    return len(done)


def copy_queue(
    src: TaskQueue, dst: TaskQueue, *, force: bool = False, batch_size: int = defaults.INSERT_BATCH_SIZE
) -> TransferReport:
    """Copy everything ``src`` holds into ``dst`` (see the module docstring).

    Raises:
        TransferRefused: leases are out (without ``force``), ``dst`` is ``src``, or ``dst``
            already has one of the jobs.
    """
    jobs = _check(src, dst, force)
    to = dst.backend
    report = TransferReport()
    signer, dst_id = src.signer, dst.queue_id

    def resealed(items: Iterable[tuple[str, bytes]]) -> Iterable[tuple[str, bytes]]:
        return ((task_id, reseal_task(signer, task_id, blob, dst_id)) for task_id, blob in items)

    for digest, blob in src.backend.iter_functions():
        to.put_function(digest, blob)
        report.functions += 1
    for job_id in jobs:
        meta = src.backend.get_job(job_id)
        if meta is not None:
            to.put_job(job_id, meta)
            report.jobs += 1
    # Fenced with the identity they were signed for: a purge of ``dst`` meanwhile stops the copy
    # (QueueIdentityChanged) instead of leaving tasks its workers refuse.
    insert = functools.partial(to.insert, queue_id=dst_id)
    report.queued = _by_job(resealed(src.backend.iter_queued()), batch_size, insert)
    if force:
        report.leased = _by_job(resealed(src.backend.iter_leased()), batch_size, insert)
    # Quarantined fq:// files are listed as letters too, under ids that are not task ids.
    letters = [
        replace(d, payload=reseal_task(signer, d.task_id, d.payload, dst_id) if d.payload else b"")
        for d in src.backend.dead()
        if ID_PATTERN.match(d.task_id)
    ]
    report.dead = _by_job(letters, batch_size, to.put_dead, key=lambda d: d.task_id)
    dead_ids = {d.task_id for d in letters}
    for job_id in jobs:
        report.completed += _copy_records(src, to, job_id, dead_ids, batch_size)
    return report


def move_queue(
    src: TaskQueue, dst: TaskQueue, *, force: bool = False, batch_size: int = defaults.INSERT_BATCH_SIZE
) -> TransferReport:
    """``copy_queue``, then purge the source."""
    report = copy_queue(src, dst, force=force, batch_size=batch_size)
    src.purge()
    return report
