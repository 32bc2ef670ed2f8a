"""The insert pipeline: any iterable of tasks → signed envelopes → batched backend writes.

Streams in constant memory: one batch of envelopes is held at a time. Nothing is written
before the first batch is complete, so a bad task among the first ``batch_size`` leaves the
queue untouched; a failure later leaves a job whose total is exactly what was queued, and the
error says so.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import defaults
from .progress import insert_bar
from .tasks import TaskCodec, to_call

if TYPE_CHECKING:
    from .jobs import Job
    from .queue import TaskQueue


def new_job_id() -> str:
    """Job ids sort by creation time and never collide."""
    return f"{time.time_ns() // 1_000_000:x}_{uuid.uuid4().hex[:10]}"


def job_meta(job_id: str, name: str | None, source: str | None) -> dict[str, Any]:
    """A fresh job record."""
    return {
        "id": job_id,
        "name": name or job_id,
        "created": time.time(),
        "total": None,
        "state": "inserting",
        "error": None,
        "source": source,
        "producer": {"host": socket.gethostname(), "pid": os.getpid()},
    }


def insert_tasks(
    queue: TaskQueue,
    tasks: Iterable[Any],
    *,
    total: int | None = None,
    name: str | None = None,
    batch_size: int = defaults.INSERT_BATCH_SIZE,
    progress: bool = True,
    source: str | None = None,
) -> Job:
    """Insert every task of ``tasks`` as one job; see ``TaskQueue.insert``."""
    from .jobs import Job

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if total is None and hasattr(tasks, "__len__"):
        total = len(tasks)  # type: ignore[arg-type]
    backend = queue.backend
    codec = TaskCodec(queue.signer, queue.serializer)
    job_id = new_job_id()
    meta = job_meta(job_id, name, source)
    queued = 0
    batch: list[tuple[str, bytes]] = []
    batch_bytes = 0
    new_functions: list[tuple[str, bytes]] = []
    bar = insert_bar(total, f"insert {meta['name']}", enabled=progress)

    def flush() -> None:
        nonlocal queued, batch, batch_bytes
        if queued == 0:
            queue._put_meta(job_id, meta)
        for digest, blob in new_functions:
            backend.put_function(digest, blob)
        new_functions.clear()
        backend.insert(job_id, batch)
        queued += len(batch)
        bar.update(len(batch))
        batch, batch_bytes = [], 0

    try:
        for index, task in enumerate(tasks):
            call = to_call(task)
            digest = None
            if call.fn is not None:
                digest, blob, new = codec.function_digest(call.fn)
                if new:
                    new_functions.append((digest, blob))
            envelope = codec.encode(f"{job_id}-{index}", job_id, call, digest)
            batch.append((f"{job_id}-{index}", envelope))
            batch_bytes += len(envelope)
            if len(batch) >= batch_size or batch_bytes >= defaults.INSERT_BATCH_BYTES:
                flush()
        if batch or queued == 0:
            flush()
    except BaseException as exc:
        if queued:
            meta.update(total=queued, state="insert_failed", error=f"{type(exc).__name__}: {exc}")
            queue._put_meta(job_id, meta)
            if hasattr(exc, "add_note"):
                exc.add_note(
                    f"nbqueue: {queued} task(s) of job {job_id} were queued before this error; "
                    f"the job's total is {queued}."
                )
        raise
    finally:
        bar.close()
    meta.update(total=queued, state="inserted")
    queue._put_meta(job_id, meta)
    return Job(queue, job_id, meta)
