"""The id grammar: job ids, task ids (``JOB-N``, N the insertion index) and worker ids.

Ids name files on fq:// and keys on redis://, so they are checked before anything is written.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence

#: Job ids are letters, digits and '_'; a task id adds ``-N``.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_]+(-[0-9]+)?$")
#: Worker ids are ``host:pid``; they name files on fq://, so no '/' and no leading '.'.
WORKER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,254}$")


def new_job_id() -> str:
    """A job id: ids sort by creation time and never collide."""
    return f"{time.time_ns() // 1_000_000:x}_{os.urandom(5).hex()}"  # 40 random bits, as uuid4's first 10 hex


def task_id(job_id: str, index: int) -> str:
    """The id of a job's ``index``-th task (counting from 0, in insertion order)."""
    return f"{job_id}-{index}"


def job_of(task_id: str) -> str:
    """The job id a task id belongs to."""
    return task_id.rsplit("-", 1)[0]


def index_of(task_id: str) -> int:
    """The insertion index of a task within its job."""
    return int(task_id.rsplit("-", 1)[1])


def in_job(task_id: str, job_id: str) -> bool:
    """True when ``task_id`` is one of ``job_id``'s tasks."""
    return task_id.startswith(f"{job_id}-")


def check_id(value: str, what: str = "id") -> str:
    """Refuse ids that could escape a directory or a key namespace."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits and '_' (task ids end in -N)")
    return value


def check_tasks_of(job_id: str, task_ids: Sequence[str]) -> list[str]:
    """``task_ids`` without repeats, each checked to be a task of ``job_id`` (ValueError)."""
    check_id(job_id, "job id")
    ids = list(dict.fromkeys(task_ids))
    for task_id in ids:
        if job_of(check_id(task_id, "task id")) != job_id:
            raise ValueError(f"task {task_id!r} is not a task of job {job_id!r}")
    return ids


def check_batch(job_id: str, tasks: Sequence[tuple[str, bytes]]) -> None:
    """Refuse an insert batch with a bad job id, a foreign or malformed task id, or a repeat,
    before anything is written."""
    check_id(job_id, "job id")
    seen: set[str] = set()
    for task_id, _ in tasks:
        check_id(task_id, "task id")
        if job_of(task_id) != job_id:
            raise ValueError(f"task {task_id!r} does not belong to job {job_id!r}")
        if task_id in seen:
            raise ValueError(f"task {task_id!r} appears twice in one insert")
        seen.add(task_id)


def check_worker_id(value: str) -> str:
    """Refuse worker ids that could escape a directory or a key namespace."""
    if not isinstance(value, str) or not WORKER_ID_PATTERN.match(value):
        raise ValueError(f"invalid worker id {value!r}: use letters, digits and '_.:-'")
    return value


class IndexSet:
    """A set of task indices of one job, a bit each: a million tasks take 125 KB. What a reader
    of a job's commits keeps to return each task once."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def __contains__(self, index: int) -> bool:
        byte = index // 8
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << (index % 8)))

    def add(self, index: int) -> bool:
        """Add ``index``; True if it was not in the set yet."""
        if index in self:
            return False
        byte = index // 8
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte + 1 - len(self._bits)))
        self._bits[byte] |= 1 << (index % 8)
        return True
