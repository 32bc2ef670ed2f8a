"""Exception types raised by nbqueue. Every failure a user can meet is one of these."""

from __future__ import annotations

import errno


class NbQueueError(Exception):
    """Base class of every nbqueue error."""


class QueueURLError(NbQueueError, ValueError):
    """A queue URL is malformed, names an unknown scheme, or points somewhere unusable."""


class UnsafeQueueError(NbQueueError, PermissionError):
    """A queue directory others may write to, or owned by another user."""


class SerializationError(NbQueueError, TypeError):
    """A task or its function cannot be serialized (raised at insert; nothing is queued)."""


class NotQueueableError(NbQueueError, TypeError):
    """The callable is not marked @queueable, so no worker would run it."""


class BindError(NbQueueError, TypeError):
    """A task's arguments do not fit its function's signature."""


class BadSignature(NbQueueError):
    """Bytes failed their HMAC check; they were never unpickled."""


class SigningKeyError(NbQueueError):
    """The signing key is missing, too short, or readable by others."""


class DecodeError(NbQueueError):
    """Bytes are not a valid nbqueue envelope, or could not be decoded."""


class Terminal(NbQueueError):
    """Raise inside a task to fail it at once, without retries (it goes to the dead letters)."""


class Cancelled(BaseException):
    """Raised inside a running task whose job (or the task itself) was cancelled.

    A ``BaseException``, as ``asyncio.CancelledError`` is, so ``except Exception`` in a task does
    not swallow it: catch it by name (or use ``finally``) to clean up, then let it go on. Also the
    error type of a cancelled task in ``errors()``.
    """


class TaskTimeout(BaseException):
    """Raised inside a running task that ran past its time limit (``@queueable(timeout=)``,
    ``insert(timeout=)``, ``nbqueue worker --task-timeout``). A failed attempt: retried as any
    other failure, and the error type of the task once it is dead. A ``BaseException`` for the
    reason ``Cancelled`` is one."""


class TaskFailed(NbQueueError):
    """Raised by Job.results() when tasks of the job failed for good."""

    def __init__(self, message: str, errors: list) -> None:
        super().__init__(message)
        self.errors = errors


class BackendUnavailable(NbQueueError, ConnectionError):
    """The storage server could not be reached (the URL is named without its password)."""


#: ``errno`` values that mean the storage is out of space: the disk is full, or a quota is reached.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFull(NbQueueError, OSError):
    """The queue's storage has no room left: a full disk or quota (``errno`` is ENOSPC or EDQUOT),
    or a Redis server at ``maxmemory`` (``errno`` ENOSPC). The write that raised it left nothing
    half-written; free space, then retry. Made like any OSError: ``StorageFull(errno, message)``.
    """


class QueueStateLost(NbQueueError):
    """The queue no longer holds what it held: its storage lost its data (a Redis server restarted
    without persistence, a flushed database) or the queue was purged. The job's tasks are gone."""


class QueueIdentityChanged(QueueStateLost):
    """An insert was fenced with the queue identity its tasks are signed for, and the queue has
    another now (it was purged, or its storage lost its data): nothing was written.

    ``current`` is the identity the storage holds, or None when it has none yet.
    """

    def __init__(self, message: str, current: str | None = None) -> None:
        super().__init__(message)
        self.current = current


class TaskRefused(NbQueueError):
    """A worker refused to run a task (it goes to the dead letters, never retried)."""


class SpecError(NbQueueError, ValueError):
    """A JSON task spec is malformed or names a function no worker would run."""


class TransferRefused(NbQueueError):
    """A copy that would lose or duplicate tasks; nothing was written."""


class SliceContractError(NbQueueError, ValueError):
    """``insert(parallel=N)`` was given an iterable whose ``__getitem__(slice)`` does not return
    exactly the items of the slice (it ignores the bounds, or yields too few)."""


class QueueEmptyError(NbQueueError, LookupError):
    """``TaskQueue.lease`` found no task ready (python-task-queue's name)."""


class NotLeasedHere(NbQueueError):
    """``delete`` or ``renew`` of a task this TaskQueue did not lease: its lease token, which
    fences both, is held by whoever leased it."""
