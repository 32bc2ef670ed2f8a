"""What a task is: ``@queueable`` functions, bound calls, registered-task objects, and the codec
that turns them into signed envelopes and back.

A task is made from ``functools.partial(fn, ...)`` of a queueable function, a bare queueable
function (called with no arguments), or an object with an ``execute()`` method whose class is
queueable (or subclasses ``RegisteredTask``). Anything else is refused at insert.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .backends.base import TaskStatus, job_of
from .errors import BadSignature, BindError, DecodeError, NotQueueableError
from .serialize import (
    Serializer,
    Signer,
    check_function_blob,
    dumps_checked,
    function_blob,
    open_envelope,
    seal,
)

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__nbqueue_queueable__"

__all__ = ["RegisteredTask", "TaskCall", "TaskCodec", "TaskStatus", "is_queueable", "queueable"]


def queueable(fn: F) -> F:
    """Mark a function (or a class whose instances have ``execute()``) as allowed on the queue.

    Workers run only queueable code. Functions defined in a notebook, closures and lambdas are
    shipped by value, with the notebook globals they use.
    """
    if not callable(fn):
        raise TypeError(f"@queueable needs a function or class, not {type(fn).__name__}")
    setattr(fn, _MARK, True)
    return fn


def is_queueable(obj: Any) -> bool:
    """True for queueable functions and for instances of queueable task classes."""
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return bool(getattr(obj, _MARK, False))
    return bool(getattr(type(obj), _MARK, False)) and callable(getattr(obj, "execute", None))


class RegisteredTask:
    """Base class for task objects in python-task-queue's style: state in ``__init__``, work in
    ``execute()``. Subclasses are queueable."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setattr(cls, _MARK, True)

    def execute(self) -> Any:
        raise NotImplementedError


@dataclass
class TaskCall:
    """One call to run: ``fn(*args, **kwargs)``, or ``obj.execute()`` when ``fn`` is None."""

    fn: Callable[..., Any] | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    obj: Any = None

    def run(self) -> Any:
        if self.fn is None:
            return self.obj.execute()
        return self.fn(*self.args, **self.kwargs)


_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def to_call(task: Any) -> TaskCall:
    """Check a task at insert time and split it into function and arguments.

    Raises:
        NotQueueableError: the callable is not marked ``@queueable``.
        BindError: the arguments do not fit the function's signature.
    """
    if isinstance(task, functools.partial):
        fn, args, kwargs = task.func, task.args, dict(task.keywords)
    elif inspect.isfunction(task):
        fn, args, kwargs = task, (), {}
    elif is_queueable(task):
        return TaskCall(None, obj=task)
    else:
        kind = type(task).__name__
        raise NotQueueableError(
            f"{kind} {task!r:.80} is not a task: insert partial(fn, ...) of an @queueable function, "
            "a queueable function, or an object with execute() whose class is queueable"
        )
    if not is_queueable(fn):
        raise NotQueueableError(f"{_name(fn)}() is not marked @queueable, so no worker would run it")
    try:
        signature = _signatures.get(fn)
        if signature is None:  # computing it costs more than the rest of an insert
            signature = _signatures[fn] = inspect.signature(fn)
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise BindError(f"{_name(fn)}(): {exc}") from None
    return TaskCall(fn, tuple(args), kwargs)


class TaskCodec:
    """Encodes calls into signed task envelopes and decodes them on a worker.

    A function is serialized once per codec (one codec per job) and stored by digest; each task
    carries only the digest and its own arguments. Decoded functions are cached by digest.
    """

    def __init__(self, signer: Signer, serializer: Serializer) -> None:
        self.signer = signer
        self.serializer = serializer
        self._blobs: dict[int, tuple[Any, str, bytes]] = {}  # id(fn) -> (fn, digest, blob)
        self._functions: dict[str, Callable[..., Any]] = {}

    # -- producer side --------------------------------------------------------------------------
    def function_digest(self, fn: Callable[..., Any]) -> tuple[str, bytes, bool]:
        """``(digest, blob, new)`` for a function; ``new`` is True the first time it is seen."""
        known = self._blobs.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1], known[2], False
        digest, blob = function_blob(fn, self.serializer)
        self._blobs[id(fn)] = (fn, digest, blob)  # keeping fn alive keeps id(fn) unique
        return digest, blob, True

    def encode(self, task_id: str, job_id: str, call: TaskCall, digest: str | None) -> bytes:
        """A signed task envelope for ``call``."""
        if call.fn is None:
            payload = dumps_checked(call.obj, self.serializer, f"task object {call.obj!r:.60}")
        else:
            payload = dumps_checked(
                (call.args, call.kwargs), self.serializer, f"arguments of {_name(call.fn)}()"
            )
        header = {"kind": "task", "t": task_id, "j": job_id, "f": digest, "c": round(time.time(), 3)}
        return seal(self.signer, header, payload)

    # -- worker side ----------------------------------------------------------------------------
    def decode(self, task_id: str, blob: bytes, fetch_function: Callable[[str], bytes]) -> TaskCall:
        """Verify and load a task. Raises BadSignature/DecodeError before running anything.

        Signature and ids are checked before any unpickling; the function blob is checked
        against the digest named in the signed header.
        """
        header, payload = open_envelope(self.signer, blob, "task", t=task_id, j=job_of(task_id))
        digest = header.get("f")
        if digest is None:
            obj = self._load(payload, "task object")
            if not is_queueable(obj):
                raise BadSignature(f"refused: {type(obj).__name__} is not a queueable task object")
            return TaskCall(None, obj=obj)
        fn = self._functions.get(digest)
        if fn is None:
            try:
                fn_blob = fetch_function(digest)
            except KeyError:
                raise DecodeError(f"function {digest[:12]}… is missing from the queue") from None
            check_function_blob(digest, fn_blob)
            fn = self._load(fn_blob, "function")
            if not is_queueable(fn):
                raise BadSignature(f"refused: {_name(fn)}() is not marked @queueable")
            self._functions[digest] = fn
        args, kwargs = self._load(payload, "arguments")
        return TaskCall(fn, args, kwargs)

    def _load(self, data: bytes, what: str) -> Any:
        try:
            return self.serializer.loads(data)
        except (ImportError, AttributeError) as exc:  # a module or name the worker lacks
            raise DecodeError(f"cannot load the {what} on this worker: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise DecodeError(f"cannot load the {what}: {type(exc).__name__}: {exc}") from exc
