"""Completion records: what a worker commits for each finished task, signed like tasks.

A record says whether the task succeeded, its value (serialized) or its error (type, message,
traceback as JSON, readable without unpickling), the attempt, start and end times and the
worker. The notebook checks the signature before loading a value.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

from .backends.base import DeadLetter
from .errors import BadSignature, DecodeError, SerializationError
from .ids import index_of, job_of
from .serialize import Serializer, Signer, loads_marked, open_envelope, plain_pickle, seal


@dataclass(frozen=True)
class TaskError:
    """Why a task failed: the exception's type, message and traceback.

    ``traceback`` starts at the task's own code (the worker's frames above it trimmed, as
    ipyparallel shows remote errors); ``full_traceback`` is all of it. ``output`` is what the
    failed attempt printed (its last ``OUTPUT_LIMIT`` characters).
    """

    task_id: str
    type: str
    message: str
    traceback: str
    attempts: int
    worker: str | None = None
    output: str = ""
    full_traceback: str = ""

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
    cancelled: bool = False  #: ended cancelled (``error.type`` is ``Cancelled``), not failed
    #: The task's plain-data arguments by parameter name (as its signed task carried them).
    params: dict[str, Any] | None = None
    #: What the task printed (stdout and stderr, interleaved; its last ``OUTPUT_LIMIT`` characters).
    output: str = ""

    @property
    def index(self) -> int:
        """The task's place in its job (insertion order)."""
        return index_of(self.task_id)


#: The task id a cancel record is made for: one record serves every task a cancel ends.
ANY_TASK = "*"


def seal_cancel_record(signer: Signer, job_id: str, message: str, worker: str) -> bytes:
    """The signed record every task ended by one cancel of job ``job_id`` shares."""
    now = time.time()
    header = {
        "kind": "result",
        "t": ANY_TASK,
        "j": job_id,
        "ok": False,
        "cancelled": True,
        "a": 0,
        "s": now,
        "e": now,
        "w": worker,
        "err": {"type": "Cancelled", "message": message, "traceback": ""},
    }
    return seal(signer, header, b"")


#: Frames in these files are the worker's, not the task's: a traceback starts below them.
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def error_info(exc: BaseException) -> dict[str, str]:
    """The JSON-able description of an exception: its traceback from the first frame outside
    nbqueue (``traceback``), and whole (``full``) when that differs."""
    full = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_DIR):
        tb = tb.tb_next
    info = {"type": type(exc).__qualname__, "message": str(exc), "traceback": full}
    if tb is not None and tb is not exc.__traceback__:
        # An error raised inside nbqueue itself (no user frame below) keeps its whole traceback.
        info["traceback"] = "".join(traceback.format_exception(type(exc), exc, tb))
        info["full"] = full
    return info


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
    params: dict[str, Any] | None = None,
    output: str = "",
) -> bytes:
    """A signed record of a success (``value``) or a failure (``error`` from ``error_info``),
    with what the task printed (``output``).

    Raises:
        SerializationError: ``value`` cannot be serialized (nothing is recorded: a worker fails
            the attempt, so the task is never "completed" without a value).
    """
    payload = b""
    header: dict[str, Any] = {}
    if error is None:
        try:
            payload = plain_pickle(value, serializer, header) or serializer.dumps(value)
        except Exception as exc:
            raise SerializationError(
                f"the task's return value cannot be serialized: {type(exc).__name__}: {exc}"
            ) from exc
    header |= {
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
    if params:
        header["p"] = params
    if output:
        header["out"] = output
    return seal(signer, header, payload)


def open_record(signer: Signer, serializer: Serializer, task_id: str, blob: bytes, job_id: str) -> TaskRecord:
    """Verify and load a record. Bytes that are not an envelope (a backend's quarantine reason)
    become an error record; a bad signature raises BadSignature before anything is loaded."""
    try:
        header, payload = open_envelope(signer, blob, "result", j=job_id)
        cancelled = header.get("cancelled") is True and header.get("t") == ANY_TASK
        if header.get("t") != task_id and not cancelled:
            raise BadSignature(f"bad signature: envelope was made for t={header.get('t')!r}, not {task_id!r}")
    except DecodeError:
        reason = blob.decode("utf-8", "replace")[:2000]
        quarantined = TaskError(task_id, "Quarantined", reason, "", 0)
        return TaskRecord(task_id, False, None, quarantined, 0, None, None, None)
    err = header.get("err")
    out = header.get("out")
    output = out if isinstance(out, str) else ""
    if header.get("ok"):
        try:
            value = loads_marked(payload, serializer, header)
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
            output,
            err.get("full") or err.get("traceback", ""),
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
        cancelled,
        header.get("p") if isinstance(header.get("p"), dict) else None,
        output,
    )


class _ValuesUnloaded:
    """A serializer that loads nothing, so ``open_record`` reads a record's header only."""

    name = "unloaded"

    def dumps(self, obj: Any) -> bytes:
        raise TypeError("a header-only reader cannot serialize")

    def loads(self, data: bytes) -> Any:
        return None


_UNLOADED = _ValuesUnloaded()


def record_header(signer: Signer, task_id: str, blob: bytes, job_id: str) -> TaskRecord:
    """A completion record without its value (``value`` is None): status, error, attempt,
    times, worker. A record that fails its signature check reads as a BadSignature error."""
    try:
        return open_record(signer, _UNLOADED, task_id, blob, job_id)
    except BadSignature as exc:
        error = TaskError(task_id, "BadSignature", str(exc), "", 0)
        return TaskRecord(task_id, False, None, error, 0, None, None, None)


def dead_letter_record(signer: Signer, letter: DeadLetter) -> TaskRecord:
    """A dead letter read as a header-only record, its error carrying the letter's attempts.

    A quarantined file (``quarantine/...``) reads as a ``Quarantined`` error with its reason; a
    letter without an error record as an error of unknown type. Nothing is unpickled.
    """
    unknown = TaskError(letter.task_id, "?", "", "", letter.attempts)
    if letter.task_id.startswith("quarantine/"):
        reason = (letter.error or b"").decode("utf-8", "replace")
        error = TaskError(letter.task_id, "Quarantined", reason, "", letter.attempts)
        return TaskRecord(letter.task_id, False, None, error, letter.attempts, None, None, None)
    if letter.error is None:
        return TaskRecord(letter.task_id, False, None, unknown, letter.attempts, None, None, None)
    record = record_header(signer, letter.task_id, letter.error, job_of(letter.task_id))
    error = unknown if record.error is None else replace(record.error, attempts=letter.attempts)
    return replace(record, error=error)
