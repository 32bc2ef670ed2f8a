"""Read-only reports on a queue, as plain dicts for the command line (``--json`` prints them).

Reports never unpickle a task, and read completion records without loading their values
(``record_header``): they check signatures and read the JSON headers only. ``result_row`` is
the exception by design: exporting results means loading the values.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .backends.base import Counts, TaskStatus
from .errors import BadSignature, DecodeError
from .ids import in_job, index_of, job_of
from .jobs import JobState
from .progress import running_shown
from .records import TaskError, TaskRecord, dead_letter_record, record_header
from .reference import export_value
from .serialize import Signer
from .tasks import open_task

if TYPE_CHECKING:
    from .queue import TaskQueue

#: How many of the soonest lease deadlines ``queue_status`` lists.
LEASES_SHOWN = 5


def task_header(signer: Signer, task_id: str, payload: bytes) -> dict | None:
    """The signed header of a task envelope, or None when it does not verify."""
    try:
        header, _ = open_task(signer, task_id, payload)
    except (BadSignature, DecodeError):
        return None
    return header


def _error_fields(error: TaskError) -> dict[str, Any]:
    return {
        "type": error.type,
        "message": error.message,
        "traceback": error.traceback,
        "full_traceback": error.full_traceback or error.traceback,
        "output": error.output,
    }


def _error_dict(error: TaskError | None) -> dict[str, Any] | None:
    return None if error is None else _error_fields(error)


def job_status(state: str | None, counts: Counts, total: int | None) -> str:
    """A job's state as a user reads it: ``inserting``, ``insert failed``, ``queued`` (nothing
    started), ``running``, ``finished`` or ``cancelled`` (finished, some of it by a cancel). The
    job record's own state only says how its insert went."""
    if state == JobState.INSERTING.value:
        return "inserting"
    if state == JobState.INSERT_FAILED.value:
        return "insert failed"
    if total is not None and counts.finished >= total:
        return "cancelled" if counts.cancelled else "finished"
    if counts.finished or counts.leased or counts.failed:
        return "running"
    return "queued"


# -- the queue -------------------------------------------------------------------------------------
def queue_status(tq: TaskQueue) -> dict[str, Any]:
    """Counters, the age of the next task to run, the soonest lease deadlines and the live workers.

    ``oldest_queued_age`` is the seconds since the task at the head of the queue was created
    (None when nothing is ready); ``leases_expiring`` lists ``LEASES_SHOWN`` leases, soonest
    first, with the seconds they have left (negative: expired, not yet reclaimed).
    """
    backend = tq.backend
    age = None
    head = backend.peek_queued(1)
    if head:
        header = task_header(tq.signer, *head[0])
        if header is not None and isinstance(header.get("c"), (int, float)):
            age = round(max(time.time() - header["c"], 0.0), 3)
    workers = []
    for worker_id, info in sorted(backend.workers().items()):
        try:
            details = json.loads(info)
        except ValueError:
            details = {}
        workers.append({"id": worker_id, **(details if isinstance(details, dict) else {})})
    return {
        "url": tq.url,
        **tq.status().as_dict(),
        "oldest_queued_age": age,
        "leases_expiring": [
            {"task_id": task_id, "expires_in": round(left, 3)}
            for task_id, left in backend.lease_deadlines(LEASES_SHOWN)
        ],
        "workers": workers,
    }


# -- one job ---------------------------------------------------------------------------------------
def job_report(tq: TaskQueue, job_id: str, *, outputs: bool = False) -> dict[str, Any]:
    """A job's record, counters, timings (created, first start, last finish) and errors (of the
    tasks that failed for good, each with what it printed: cancelled ones are counted, not
    listed); with ``outputs``, what every finished task printed (``outputs``: task id, index and
    text, for the tasks that printed anything).

    Raises:
        KeyError: the queue has no such job.
    """
    job = tq.job(job_id)
    counts, workers = job.counts(), tq.backend.workers()
    raw = tq.backend.results(job_id)
    records = [record_header(tq.signer, t, raw[t], job_id) for t in sorted(raw, key=index_of)]
    started = [r.started for r in records if r.started is not None]
    finished = [r.finished for r in records if r.finished is not None]
    errors = [
        {"task_id": r.error.task_id, "attempts": r.error.attempts, **_error_fields(r.error)}
        for r in records
        if not r.ok and r.error is not None and not r.cancelled
    ]
    report: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": job.meta.get("state"),
        "total": job.total,
        **counts.as_dict(),
        "created": job.meta.get("created"),
        "first_started": min(started, default=None),
        "last_finished": max(finished, default=None),
        "errors": errors,
        "running": [asdict(p) for p in job.running_progress(workers)],
        "running_now": running_shown(counts, job.running_now(workers)),
        "workers": sorted(job.workers_ran(workers)),
    }
    if outputs:
        report["outputs"] = [
            {"task_id": r.task_id, "index": r.index, "output": r.output} for r in records if r.output
        ]
    return report


def result_row(record: TaskRecord, job_id: str) -> dict[str, Any]:
    """One exported result: its value in the JSON encoding of ``nbqueue.reference``."""
    return {
        "task_id": record.task_id,
        "job_id": job_id,
        "success": record.ok,
        "result": export_value(record.value) if record.ok else None,
        "error": _error_dict(record.error),
        "attempts": record.attempt,
        "started": record.started,
        "finished": record.finished,
    }


# -- one task --------------------------------------------------------------------------------------
def _payload_report(tq: TaskQueue, task_id: str, payload: bytes) -> dict[str, Any]:
    """Size, signature, header and function of a task payload, without loading any of it."""
    out: dict[str, Any] = {"bytes": len(payload)}
    try:
        header, body = open_task(tq.signer, task_id, payload)
    except (BadSignature, DecodeError) as exc:
        out["signature"] = f"bad: {exc}"
        return out
    out["signature"] = "ok" if tq.signer.key is not None else "not checked (insecure)"
    out["header"] = header
    if "f" not in header:
        try:
            out["function"] = json.loads(body).get("fn")  # the JSON spec; its arguments stay unread
        except (ValueError, AttributeError):
            out["function"] = None
        out["kind"] = "by reference (JSON)"
    elif header["f"] is None:
        out["kind"] = "pickled task object"
    else:
        out["kind"] = "pickled arguments"
        try:
            size = len(tq.backend.get_function(header["f"]))
            out["function"] = f"digest {header['f']} ({size} bytes of dill)"
        except KeyError:
            out["function"] = f"digest {header['f']} (missing from the queue)"
    return out


def inspect_task(tq: TaskQueue, task_id: str) -> dict[str, Any]:
    """Where a task is, its attempts, its payload (size, header, function: never loaded) and its
    error. A completed task whose record is an error (a purged dead letter) reads as dead.

    Raises:
        KeyError: the queue does not know the task.
    """
    info = tq.backend.find_task(task_id)
    if info is None:
        raise KeyError(f"no task {task_id!r} in {tq.url}")
    job_id = job_of(task_id)
    state, attempts, error = info.status.value, info.attempts, None
    finished = info.status in (TaskStatus.COMPLETED, TaskStatus.DEAD, TaskStatus.CANCELLED)
    blob = tq.backend.results(job_id).get(task_id) if finished else None
    if blob is not None:
        record = record_header(tq.signer, task_id, blob, job_id)
        attempts = attempts or record.attempt
        error = _error_dict(record.error)
        if not record.ok:
            state = (TaskStatus.CANCELLED if record.cancelled else TaskStatus.DEAD).value
    try:
        job_name = tq.job(job_id).name
    except KeyError:
        job_name = None
    return {
        "task_id": task_id,
        "job_id": job_id,
        "job_name": job_name,
        "state": state,
        "attempts": attempts,
        "expires_in": None if info.expires_in is None else round(info.expires_in, 3),
        "payload": None if info.payload is None else _payload_report(tq, task_id, info.payload),
        "error": error,
    }


def dead_letter_line(row: dict[str, Any]) -> str:
    """One dead letter (a row of ``dead_letters``) as a line of text."""
    return f"{row['task_id']}  attempts={row['attempts']}  {row['type']}: {row['message']}"


def dead_letters(tq: TaskQueue, job_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Dead letters as rows (task, attempts, payload size, error type, message, traceback, the
    whole traceback, what the task printed, when), newest first; of one job when ``job_id`` is
    given. Nothing is unpickled."""
    rows: list[dict[str, Any]] = []
    for letter in tq.dead():
        if job_id is not None and not in_job(letter.task_id, job_id):
            continue
        record = dead_letter_record(tq.signer, letter)
        error = record.error
        rows.append(
            {
                "task_id": letter.task_id,
                "attempts": letter.attempts,
                "bytes": len(letter.payload),
                **(_error_fields(error) if error else {"type": "?", "message": "", "traceback": ""}),
                "finished": record.finished,
                "worker": record.worker,
            }
        )
    rows.sort(key=lambda r: float(r["finished"] or 0), reverse=True)
    return rows[:limit] if limit else rows
