"""Completion records: what a worker commits for each finished task, signed like tasks.

A record says whether the task succeeded, its value (serialized) or its error (type, message,
traceback as JSON, readable without unpickling), the attempt, start and end times and the
worker. The notebook checks the signature before loading a value.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from .errors import BadSignature, DecodeError
from .serialize import Serializer, Signer, open_envelope, seal


@dataclass(frozen=True)
class TaskError:
    """Why a task failed: the exception's type, message and formatted traceback."""

    task_id: str
    type: str
    message: str
    traceback: str
    attempts: int
    worker: str | None = None

    def __str__(self) -> str:
        return f"{self.task_id}: {self.type}: {self.message} (after {self.attempts} attempt(s))"


@dataclass(frozen=True)
class TaskRecord:
    """One committed record: a value or an error, with timing."""

    task_id: str
    ok: bool
    value: Any
    error: TaskError | None
    attempt: int
    started: float | None
    finished: float | None
    worker: str | None


def error_info(exc: BaseException) -> dict[str, str]:
    """The JSON-able description of an exception."""
    return {
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def seal_record(
    signer: Signer,
    serializer: Serializer,
    task_id: str,
    job_id: str,
    *,
    value: Any = None,
    error: dict | None = None,
    attempt: int,
    started: float | None,
    finished: float | None,
    worker: str,
) -> bytes:
    """A signed record of a success (``value``) or a failure (``error`` from ``error_info``)."""
    payload = b""
    if error is None:
        try:
            payload = serializer.dumps(value)
        except Exception as exc:  # the task worked but its value cannot travel: record why
            error = error_info(exc)
            error["message"] = f"the task's return value cannot be serialized: {error['message']}"
    header = {
        "kind": "result",
        "t": task_id,
        "j": job_id,
        "ok": error is None,
        "a": attempt,
        "s": started,
        "e": finished,
        "w": worker,
        "err": error,
    }
    return seal(signer, header, payload)


def open_record(signer: Signer, serializer: Serializer, task_id: str, blob: bytes, job_id: str) -> TaskRecord:
    """Verify and load a record. Bytes that are not an envelope (a backend's quarantine reason)
    become an error record; a bad signature raises BadSignature before anything is loaded."""
    try:
        header, payload = open_envelope(signer, blob, "result", t=task_id, j=job_id)
    except DecodeError:
        reason = blob.decode("utf-8", "replace")[:2000]
        err = TaskError(task_id, "Quarantined", reason, "", 0)
        return TaskRecord(task_id, False, None, err, 0, None, None, None)
    err = header.get("err")
    if header.get("ok"):
        try:
            value = serializer.loads(payload)
        except Exception as exc:
            raise DecodeError(f"cannot load the result of {task_id}: {type(exc).__name__}: {exc}") from exc
        error = None
    else:
        if not isinstance(err, dict):
            raise BadSignature(f"record of {task_id} has no error description")
        value = None
        error = TaskError(
            task_id,
            err.get("type", "?"),
            err.get("message", ""),
            err.get("traceback", ""),
            header.get("a", 0),
            header.get("w"),
        )
    return TaskRecord(
        task_id,
        bool(header.get("ok")),
        value,
        error,
        header.get("a", 0),
        header.get("s"),
        header.get("e"),
        header.get("w"),
    )
