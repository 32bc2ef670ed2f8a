"""What a task is: ``@queueable`` functions, bound calls, registered-task objects, task specs,
and the codec that turns them into signed envelopes and back.

A task is made from ``functools.partial(fn, ...)`` of a queueable function, a bare queueable
function (called with no arguments), an object with an ``execute()`` method whose class is
queueable (or subclasses ``RegisteredTask``), or a ``TaskSpec`` naming a queueable function by
``module:qualname``. Anything else is refused at insert.

Two payload flavours share the signed envelope. By value (the default): the function travels
once per job as a dill blob named by its digest (header ``f``) and each task carries its pickled
arguments. By reference (``@queueable(by_reference=True)`` functions and task specs): the header
has no ``f`` and the payload is a JSON spec (``reference.py``); the worker imports the function
and unpickles nothing, which is what a worker started with ``--only-by-reference`` insists on.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import math
import numbers
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from . import reference
from .errors import (
    BadSignature,
    BindError,
    DecodeError,
    NbQueueError,
    NotQueueableError,
    SerializationError,
    SpecError,
    TaskRefused,
)
from .ids import job_of
from .reference import TaskSpec
from .serialize import (
    Serializer,
    Signer,
    check_function_blob,
    dumps_checked,
    function_blob,
    loads_marked,
    open_envelope,
    plain_pickle,
    seal,
)

_MARK = "__nbqueue_queueable__"
_BY_REFERENCE = "__nbqueue_by_reference__"
_TIMEOUT = "__nbqueue_timeout__"

__all__ = [
    "FunctionTask",
    "RegisteredTask",
    "TaskCall",
    "TaskCodec",
    "TaskSpec",
    "is_queueable",
    "is_single_task",
    "load_specs",
    "queue_id_of",
    "set_queue_id",
    "mark",
]


def check_timeout(timeout: float | None) -> float | None:
    """A task time limit in seconds (None: none), or ValueError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"a task timeout is a positive number of seconds, not {timeout!r}")
    return float(timeout)


def mark(fn: Any, *, by_reference: bool = False, timeout: float | None = None) -> Any:
    """Mark a function (or a class whose instances have ``execute()``) as allowed on the queue.

    This is the mark workers check; ``nbqueue.queueable`` adds ``submit``/``map`` on top.

    Raises:
        TypeError: ``fn`` is not callable, or ``by_reference`` is asked of a non-function.
    """
    if not callable(fn):
        raise TypeError(f"@queueable needs a function or class, not {type(fn).__name__}")
    if by_reference and not inspect.isfunction(fn):
        raise TypeError(f"by_reference=True needs a function, not {type(fn).__name__}")
    setattr(fn, _MARK, True)
    if by_reference:
        setattr(fn, _BY_REFERENCE, True)
    if timeout is not None:
        setattr(fn, _TIMEOUT, check_timeout(timeout))
    return fn


# Function blobs queued before ``queueable`` moved to ``nbqueue.handles`` name these two by
# reference (as ``fn.submit``/``fn.map``): they must keep loading on workers, which never call
# them. Calling one says where the real one lives.
def _submit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    raise NbQueueError("this function was queued by an older nbqueue: use nbqueue.handles.submit(fn, ...)")


def _map(fn: Callable[..., Any], iterable: Iterable[Any], **options: Any) -> Any:
    raise NbQueueError("this function was queued by an older nbqueue: use nbqueue.handles.map_tasks(fn, ...)")


def is_queueable(obj: Any) -> bool:
    """True for queueable functions and for instances of queueable task classes."""
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return bool(getattr(obj, _MARK, False))
    return bool(getattr(type(obj), _MARK, False)) and callable(getattr(obj, "execute", None))


#: python-task-queue's registry: class name -> the latest RegisteredTask subclass of that name,
#: which is how ``RegisteredTask.deserialize`` turns a payload back into a task.
_registered: dict[str, type] = {}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _plain(value: Any) -> Any:
    """``value`` as JSON-friendly data, as python-task-queue's payloads have it: numpy arrays
    as lists, objects with a ``serialize()`` method as what it returns, bytes as text."""
    if callable(getattr(value, "serialize", None)):
        return value.serialize()
    if callable(getattr(value, "tolist", None)):  # numpy arrays and scalars, without numpy
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf8")
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class RegisteredTask:
    """Base class for task objects in python-task-queue's style: state in ``__init__``, work in
    ``execute()``. Subclasses are queueable.

    As there, a subclass may hand its constructor's arguments to ``super().__init__(a, b)``: they
    are recorded by name and set as attributes, ``payload()`` describes the task as JSON-friendly
    data, and ``RegisteredTask.deserialize(payload)`` builds it again. On a queue the object
    itself travels (with dill), so attributes need not be JSON.
    """

    _arg_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setattr(cls, _MARK, True)
        init = cls.__dict__.get("__init__")
        if init is not None:  # without one, the parent's names hold
            params = list(inspect.signature(init).parameters.values())[1:]  # after self
            cls._arg_names = tuple(p.name for p in params if p.kind in _POSITIONAL)
        _registered[cls.__name__] = cls

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Record the arguments by the subclass constructor's parameter names, as attributes."""
        if len(args) > len(self._arg_names):
            raise TypeError(
                f"{type(self).__name__}: {len(args)} positional arguments for "
                f"{len(self._arg_names)} parameters {self._arg_names}"
            )
        named = dict(zip(self._arg_names, args, strict=False))  # fewer: the rest by keyword
        named.update(kwargs)
        self._args = named
        self.__dict__.update(named)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @property
    def id(self) -> Any:
        """The task's id in the queue it was leased or listed from (-1 before that)."""
        return self.__dict__.get("nbqueue_task_id", -1)

    def _arg_values(self) -> dict[str, Any]:
        names = self.__dict__.get("_args")
        if names is None:  # a subclass that set its attributes itself
            return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "nbqueue_task_id"}
        return {name: getattr(self, name) for name in names}

    def payload(self) -> dict[str, Any]:
        """The task as JSON-friendly data: its arguments' current values and its class name."""
        data = _plain(self._arg_values())
        data["class"] = type(self).__name__
        return data

    @classmethod
    def deserialize(cls, data: dict[str, Any] | str | bytes) -> RegisteredTask:
        """The task a ``payload()`` (a dict, or its JSON) describes, built by its class.

        Raises:
            NotQueueableError: no RegisteredTask subclass of that name was defined in this process,
                or it is not a ``cls``.
        """
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        assert isinstance(data, dict)
        arguments = dict(data)
        name = arguments.pop("class", None)
        target = _registered.get(str(name))
        if target is None or not issubclass(target, cls):
            raise NotQueueableError(f"no {cls.__name__} subclass named {name!r} is defined here")
        return target(**arguments)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._arg_values().items())
        return f"{type(self).__name__}({shown})"


class FunctionTask:
    """A call of a queueable function read back from a queue (``TaskQueue.lease``, ``list``,
    ``tasks``): python-task-queue's name for it. ``execute()`` (or calling it) runs it."""

    def __init__(self, call: TaskCall, task_id: str) -> None:
        self.call = call
        self.id = task_id
        self.value: Any = None  #: what the function returned, once it ran

    @property
    def fn(self) -> Callable[..., Any]:
        return self.call.fn if self.call.fn is not None else self.call.obj.execute

    @property
    def args(self) -> tuple:
        return self.call.args

    @property
    def kwargs(self) -> dict:
        return self.call.kwargs

    def execute(self) -> Any:
        """Run the call; the value is kept for the completion record ``delete()`` writes."""
        self.value = self.call.run()
        return self.value

    __call__ = execute

    def __repr__(self) -> str:
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"FunctionTask({callable_name(self.fn)}({', '.join(shown)}), id={self.id!r})"


@dataclass(frozen=True)
class TaskContext:
    """What a task running on a worker may know about itself: see ``current_task()``."""

    task_id: str
    job_id: str
    attempt: int  #: 1 on the first run; a task re-run after its worker died sees 2, and so on
    lease_token: str  #: unique to this lease: a re-run of the same attempt number has another
    worker: str  #: ``host:pid`` of the worker process
    #: Where ``progress`` reports go (the worker's board); None: nowhere (a task run by hand).
    reporter: Callable[[str, float, float | None, str], None] | None = field(
        default=None, repr=False, compare=False
    )

    def __reduce__(self) -> tuple[Any, ...]:
        # The reporter is the worker's own board, not data: a context a task returns travels
        # without it.
        return (TaskContext, (self.task_id, self.job_id, self.attempt, self.lease_token, self.worker))

    def progress(self, done: float, total: float | None = None, note: str = "") -> None:
        """Say how far this task got: ``done`` of ``total`` (None: unknown), with a short note.

        Call it as often as you like: the worker keeps only the latest and sends it with its next
        heartbeat (about once a second while it changes), never a storage write per call. The
        job's widget, ``nbqueue job``, ``%queue job`` and the server's job route show it.
        """
        if not isinstance(done, (int, float)) or isinstance(done, bool):
            raise TypeError(f"progress(done=...) takes a number, not {type(done).__name__}")
        if total is not None and (not isinstance(total, (int, float)) or isinstance(total, bool)):
            raise TypeError(f"progress(total=...) takes a number or None, not {type(total).__name__}")
        if self.reporter is not None:
            self.reporter(self.task_id, float(done), None if total is None else float(total), str(note)[:200])


_running: ContextVar[TaskContext | None] = ContextVar("nbqueue_running_task", default=None)


def current_task() -> TaskContext | None:
    """The task the calling code runs as, on a worker; None anywhere else.

    Tasks run at least once: a task whose worker dies mid-run runs again. A side effect that must
    not happen twice can be keyed by ``task_id`` (or ``task_id`` and ``attempt`` to keep every try).
    """
    return _running.get()


@contextmanager
def running_as(context: TaskContext) -> Iterator[None]:
    """Make ``current_task()`` return ``context`` while the task runs (used by workers)."""
    reset = _running.set(context)
    try:
        yield
    finally:
        _running.reset(reset)


@dataclass
class TaskCall:
    """One call to run: ``fn(*args, **kwargs)``, or ``obj.execute(*args, **kwargs)`` when ``fn``
    is None.

    A call by reference has ``ref`` (``module:qualname``); on the producer its ``fn`` is None,
    since the function is named rather than shipped, and a worker fills it in by importing it.
    """

    fn: Callable[..., Any] | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    obj: Any = None
    ref: str | None = None
    timeout: float | None = None  #: the job's time limit per task, from the signed header
    #: The plain-data arguments by parameter name (``plain_params``), from the signed header.
    params: dict[str, Any] | None = None

    @property
    def time_limit(self) -> float | None:
        """Seconds the task may run: its job's limit, else its function's (``@queueable(timeout=)``)."""
        if self.timeout is not None:
            return self.timeout
        marked = self.fn if self.fn is not None else type(self.obj)
        limit = getattr(marked, _TIMEOUT, None)
        return limit if isinstance(limit, (int, float)) and limit > 0 else None

    def run(self) -> Any:
        if self.fn is None:
            return self.obj.execute(*self.args, **self.kwargs)
        return self.fn(*self.args, **self.kwargs)


_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_simple_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_references: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def callable_name(fn: Any) -> str:
    """A callable's name for messages: its qualified name, else its repr."""
    return getattr(fn, "__qualname__", None) or repr(fn)


def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, computed once per function (it costs more than the rest of an
    insert). Raises as ``inspect.signature`` does."""
    signature = _signatures.get(fn)
    if signature is None:
        signature = _signatures[fn] = inspect.signature(fn)
    return signature


def _simple_signature(fn: Callable[..., Any]) -> tuple[tuple[str, ...], int] | None:
    """``(names, required)`` when every parameter of ``fn`` is a plain positional-or-keyword
    one (no ``*args``, ``**kwargs``, keyword- or positional-only): the first ``required`` names
    have no default. None otherwise. Computed once per function."""
    known = _simple_signatures.get(fn, False)
    if known is not False:
        return known
    simple: tuple[tuple[str, ...], int] | None = None
    try:
        params = list(signature_of(fn).parameters.values())
    except (TypeError, ValueError):
        params = None
    if params is not None and all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        simple = (tuple(p.name for p in params), sum(p.default is inspect.Parameter.empty for p in params))
    _simple_signatures[fn] = simple
    return simple


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Check that the arguments fit ``fn``; return the plain ones by parameter name."""
    simple = _simple_signature(fn)
    if simple is not None:
        # The usual notebook function: the arguments fit when every name given is a parameter
        # not given by position and every parameter without a default is given; named in the
        # signature's order, as ``Signature.bind`` names them. Anything else goes to ``bind``,
        # which says what is wrong.
        names, required = simple
        n = len(args)
        if (
            n <= len(names)
            and all(k in names[n:] for k in kwargs)
            and all(p in kwargs for p in names[n:required])
        ):
            return plain_params(
                {
                    name: args[i] if i < n else kwargs[name]
                    for i, name in enumerate(names)
                    if i < n or name in kwargs
                }
            )
    try:
        bound = signature_of(fn).bind(*args, **kwargs)
    except TypeError as exc:
        raise BindError(f"{callable_name(fn)}(): {exc}") from None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            named.update((f"{name}[{i}]", v) for i, v in enumerate(value))
        else:
            named[name] = value
    return plain_params(named)


#: Longest string argument kept as a parameter of a task (``TaskCall.params``).
PARAM_STR_MAX = 200
#: At most this many parameters are kept per task.
PARAMS_MAX = 32


def plain_params(named: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments that are plain data (numbers, short strings, booleans, None), by name: what
    a task's signed header carries, its record keeps, and ``Job.to_dataframe`` shows as columns.
    Anything else (arrays, frames, objects) is left out: it may be large, and it stays in the
    task's pickled arguments."""
    out: dict[str, Any] = {}
    for name, value in named.items():
        if isinstance(value, enum.Enum):
            continue
        if not isinstance(value, (bool, int, float)) and isinstance(value, numbers.Number):
            value = getattr(value, "item", lambda v=value: v)()  # a numpy scalar: its Python value
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)  # JSON has no NaN or infinity
        if isinstance(value, str) and len(value) > PARAM_STR_MAX:
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[str(name)] = value
            if len(out) >= PARAMS_MAX:
                break
    return out or None


def _reference_of(fn: Callable[..., Any]) -> str:
    ref = _references.get(fn)
    if ref is None:
        try:
            ref = _references[fn] = reference.reference_of(fn)
        except ValueError as exc:
            raise NotQueueableError(f"by_reference: {exc}") from None
    return ref


def _spec_call(spec: TaskSpec) -> TaskCall:
    """Check a spec as a worker will see it: the function imports, is queueable and takes the
    arguments."""
    try:
        fn = reference.resolve(spec.fn)
    except (ImportError, AttributeError) as exc:
        raise NotQueueableError(f"{spec.fn}: cannot import it: {exc}") from None
    if not inspect.isfunction(fn) or not is_queueable(fn):
        raise NotQueueableError(f"{spec.fn} is not an @queueable function, so no worker would run it")
    params = _bind(fn, spec.args, spec.kwargs)
    return TaskCall(None, spec.args, spec.kwargs, ref=spec.fn, params=params)


def to_call(task: Any) -> TaskCall:
    """Check a task at insert time and split it into function and arguments.

    Raises:
        NotQueueableError: the callable is not marked ``@queueable`` (or, by reference, cannot
            be imported by name).
        BindError: the arguments do not fit the function's signature.
    """
    if isinstance(task, TaskSpec):
        return _spec_call(task)
    if isinstance(task, FunctionTask):  # read back from a queue (checked then): again as it was
        return task.call
    if _is_call_tuple(task):
        return _tuple_call(*task)
    if isinstance(task, functools.partial):
        fn, args, kwargs = task.func, task.args, dict(task.keywords)
    elif inspect.isfunction(task):
        fn, args, kwargs = task, (), {}
    elif is_queueable(task):
        return TaskCall(None, obj=task, params=plain_params(getattr(task, "__dict__", {})))
    else:
        kind = type(task).__name__
        raise NotQueueableError(
            f"{kind} {task!r:.80} is not a task: insert partial(fn, ...) of an @queueable function, "
            "a queueable function, or an object with execute() whose class is queueable"
        )
    if not is_queueable(fn):
        raise NotQueueableError(f"{callable_name(fn)}() is not marked @queueable, so no worker would run it")
    params = _bind(fn, args, kwargs)
    if getattr(fn, _BY_REFERENCE, False):
        return TaskCall(None, tuple(args), kwargs, ref=_reference_of(fn), params=params)
    return TaskCall(fn, tuple(args), kwargs, params=params)


def set_queue_id(task: Any, task_id: str) -> None:
    """Give a task object read back from a queue its id there (``task.id`` on a RegisteredTask)."""
    with contextlib.suppress(AttributeError):  # an object without a __dict__ keeps no id
        task.nbqueue_task_id = task_id


def queue_id_of(task: Any) -> str | None:
    """The id a task read back from a queue has there (None for any other object)."""
    task_id = task.id if isinstance(task, FunctionTask) else getattr(task, "nbqueue_task_id", None)
    return task_id if isinstance(task_id, str) else None


def is_single_task(obj: Any) -> bool:
    """True for one task (rather than an iterable of them): what ``insert(task)`` accepts."""
    return (
        isinstance(obj, (functools.partial, TaskSpec, FunctionTask))
        or inspect.isfunction(obj)
        or is_queueable(obj)
    )


def _is_call_tuple(task: Any) -> bool:
    """python-task-queue's ``(task, args, kwargs)``: a task and the arguments to call it with."""
    return (
        isinstance(task, tuple)
        and len(task) == 3
        and isinstance(task[1], (list, tuple))
        and isinstance(task[2], dict)
        and (
            isinstance(task[0], functools.partial)
            or callable(getattr(task[0], "execute", None))
            or inspect.isfunction(task[0])
        )
    )


def _tuple_call(task: Any, args: list | tuple, kwargs: dict) -> TaskCall:
    """``(fn or partial, args, kwargs)`` calls it with them; ``(obj, args, kwargs)`` calls
    ``obj.execute(*args, **kwargs)``."""
    if isinstance(task, functools.partial) or inspect.isfunction(task):
        return to_call(functools.partial(task, *args, **kwargs))
    call = to_call(task)
    params = _bind(task.execute, tuple(args), dict(kwargs))
    return TaskCall(
        None,
        tuple(args),
        dict(kwargs),
        obj=call.obj,
        params={**(call.params or {}), **(params or {})} or None,
    )


def _arguments(call: TaskCall) -> list[tuple[str, Any]]:
    """A call's arguments by name, for an error that says which one cannot travel."""
    named = [(f"argument {i}", a) for i, a in enumerate(call.args)]
    return named + [(f"argument {k!r}", v) for k, v in call.kwargs.items()]


def open_task(signer: Signer, task_id: str, blob: bytes) -> tuple[dict, bytes]:
    """Verify a task envelope made for ``task_id`` (and its job): its header and payload.

    Raises BadSignature or DecodeError; nothing in it is loaded.
    """
    return open_envelope(signer, blob, "task", t=task_id, j=job_of(task_id))


def reseal_task(signer: Signer, task_id: str, blob: bytes, queue_id: str) -> bytes:
    """The same task envelope signed for another queue (what ``nbqueue cp``/``mv`` write).

    The envelope is verified first; bytes that do not verify are returned unchanged, so they are
    refused (and dead-lettered with the reason) where they land, exactly as in their source.
    """
    try:
        header, payload = open_task(signer, task_id, blob)
    except (BadSignature, DecodeError):
        return blob
    return seal(signer, {**header, "q": queue_id}, payload)


def load_specs(lines: Iterable[str], source: str = "specs") -> list[TaskSpec]:
    """Read JSON task specs, one per line (blank lines are skipped), checking each as an insert
    would: well formed, the function importable and ``@queueable``, the arguments fitting it.

    Every line is checked before anything is returned, so a bad file queues nothing.

    Raises:
        SpecError: naming the line of the first bad spec, or saying there was none.
    """
    specs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            spec = reference.parse_spec(json.loads(line))
            to_call(spec)
        except (ValueError, NbQueueError) as exc:
            raise SpecError(f"{source} line {number}: {exc}") from None
        specs.append(spec)
    if not specs:
        raise SpecError(f"{source} holds no task specs")
    return specs


class TaskCodec:
    """Encodes calls into signed task envelopes and decodes them on a worker.

    A function is serialized once per codec (one codec per job) and stored by digest; each task
    carries only the digest and its own arguments. Decoded functions are cached by digest.

    Args:
        queue_id: the identity of the queue (``Backend.queue_id``): tasks are signed for it, and
            a task signed for another queue is refused before anything is loaded. A worker may
            pass None and have it read (``refresh_queue_id``) at its first task.
        refresh_queue_id: reads the queue's identity again; a worker's queue gets a new one
            when it is purged, so a mismatch is checked against a fresh read before refusing.
        only_by_reference: refuse (``TaskRefused``) every task that ships pickled code or
            objects, before loading any of it.
    """

    def __init__(
        self,
        signer: Signer,
        serializer: Serializer,
        queue_id: str | None,
        *,
        refresh_queue_id: Callable[[], str] | None = None,
        only_by_reference: bool = False,
    ) -> None:
        self.signer = signer
        self.serializer = serializer
        self.queue_id = queue_id
        self.refresh_queue_id = refresh_queue_id
        self.only_by_reference = only_by_reference
        self._blobs: dict[int, tuple[Any, str, bytes]] = {}  # id(fn) -> (fn, digest, blob)
        # Decoded functions by digest, and imported ones by 'module:qualname' (never a digest).
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

    def functions(self) -> list[tuple[str, bytes]]:
        """``(digest, blob)`` of every function this codec has encoded."""
        return [(digest, blob) for _, digest, blob in self._blobs.values()]

    def encode(
        self, task_id: str, job_id: str, call: TaskCall, digest: str | None, timeout: float | None = None
    ) -> bytes:
        """A signed task envelope for ``call`` (with the job's time limit per task, if any)."""
        header: dict[str, Any] = {
            "kind": "task",
            "q": self.queue_id,
            "t": task_id,
            "j": job_id,
            "c": round(time.time(), 3),
        }
        if timeout is not None:
            header["to"] = timeout
        if call.params:
            header["p"] = call.params
        if call.ref is not None:
            try:
                payload = reference.dumps_spec(TaskSpec(call.ref, call.args, call.kwargs))
            except TypeError as exc:
                raise SerializationError(
                    f"cannot send the arguments of {call.ref} by reference: {exc}"
                ) from None
            # No "f": a worker reads the payload as JSON and unpickles nothing.
            return seal(self.signer, header, payload)
        if call.fn is None and (call.args or call.kwargs):
            # "a": the payload is the object and the arguments its execute() is called with.
            payload = dumps_checked(
                (call.obj, call.args, call.kwargs), self.serializer, f"task object {call.obj!r:.60}"
            )
            header["a"] = 1
        elif call.fn is None:
            payload = dumps_checked(call.obj, self.serializer, f"task object {call.obj!r:.60}")
        else:
            arguments = (call.args, call.kwargs)
            payload = plain_pickle(arguments, self.serializer, header) or dumps_checked(
                arguments,
                self.serializer,
                f"arguments of {callable_name(call.fn)}()",
                parts=functools.partial(_arguments, call),
            )
        header["f"] = digest
        return seal(self.signer, header, payload)

    # -- worker side ----------------------------------------------------------------------------
    def decode(self, task_id: str, blob: bytes, fetch_function: Callable[[str], bytes]) -> TaskCall:
        """Verify and load a task. Raises BadSignature/DecodeError before running anything.

        Signature and ids are checked before any unpickling; the function blob is checked
        against the digest named in the signed header.
        """
        header, payload = open_task(self.signer, task_id, blob)
        self._check_queue(header.get("q"))
        call = self._decode(header, payload, fetch_function)
        limit = header.get("to")
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0:
            call.timeout = float(limit)
        params = header.get("p")
        call.params = params if isinstance(params, dict) else None
        return call

    def _decode(self, header: dict, payload: bytes, fetch_function: Callable[[str], bytes]) -> TaskCall:
        if "f" not in header:
            return self._by_reference(payload)
        if self.only_by_reference:
            raise TaskRefused(
                "refused: this worker runs only tasks by reference (--only-by-reference) and this "
                "task ships pickled code; it was not loaded"
            )
        digest = header.get("f")
        if digest is None:
            loaded = self._load(payload, "task object")
            obj, args, kwargs = loaded if header.get("a") else (loaded, (), {})
            if not is_queueable(obj):
                raise BadSignature(f"refused: {type(obj).__name__} is not a queueable task object")
            return TaskCall(None, tuple(args), dict(kwargs), obj=obj)
        fn = self._functions.get(digest)
        if fn is None:
            try:
                fn_blob = fetch_function(digest)
            except KeyError:
                raise DecodeError(f"function {digest[:12]}… is missing from the queue") from None
            check_function_blob(digest, fn_blob)
            fn = self._load(fn_blob, "function")
            if not is_queueable(fn):
                raise BadSignature(f"refused: {callable_name(fn)}() is not marked @queueable")
            self._functions[digest] = fn
        args, kwargs = self._load(payload, "arguments", header)
        return TaskCall(fn, args, kwargs)

    def _check_queue(self, signed_for: Any) -> None:
        """Refuse a task signed for another queue: a valid envelope copied in from elsewhere."""
        if signed_for == self.queue_id:
            return
        if self.refresh_queue_id is not None:
            self.queue_id = self.refresh_queue_id()
            if signed_for == self.queue_id:
                return
        raise BadSignature(
            f"refused: the task was signed for queue {signed_for!r}, not this one ({self.queue_id!r}); "
            "it was copied in from another queue, or the queue was purged since"
        )

    def _by_reference(self, payload: bytes) -> TaskCall:
        try:
            spec = reference.loads_spec(payload)
        except ValueError as exc:
            raise DecodeError(f"unreadable task by reference: {exc}") from None
        fn = self._functions.get(spec.fn)
        if fn is None:
            try:
                fn = reference.resolve(spec.fn)
            except (ImportError, AttributeError) as exc:
                raise DecodeError(
                    f"cannot import {spec.fn} on this worker: {type(exc).__name__}: {exc}"
                ) from exc
            if not inspect.isfunction(fn) or not is_queueable(fn):
                raise TaskRefused(f"refused: {spec.fn} is not an @queueable function")
            self._functions[spec.fn] = fn
        return TaskCall(fn, spec.args, spec.kwargs, ref=spec.fn)

    def _load(self, data: bytes, what: str, header: dict | None = None) -> Any:
        try:
            return loads_marked(data, self.serializer, header or {})
        except (ImportError, AttributeError) as exc:  # a module or name the worker lacks
            raise DecodeError(f"cannot load the {what} on this worker: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise DecodeError(f"cannot load the {what}: {type(exc).__name__}: {exc}") from exc
