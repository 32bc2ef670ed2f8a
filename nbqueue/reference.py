"""Tasks by reference: a function named ``module:qualname`` and JSON arguments; no code travels.

A by-reference task's signed envelope names no function digest (its header has no ``f``) and
its payload is JSON, never a pickle; a worker imports the function it names, and runs it only
if it is marked ``@queueable``. The payload is a *task spec*, the same object a producer in
another language writes, one per line, for ``nbqueue insert URL specs.jsonl``::

    {"fn": "pkg.mod:func", "args": [1, "a"], "kwargs": {"scale": 2}}

``args`` and ``kwargs`` may be left out. JSON's own values (null, booleans, numbers, strings,
arrays, objects with string keys) stand for themselves; a tuple travels as a list. Other values
use an explicit tagged encoding, an object with exactly these keys:

======================  ==========================================================================
value                   encoded as
======================  ==========================================================================
``bytes``               ``{"__bytes__": "<base64>"}``
``numpy.ndarray``       ``{"__ndarray__": "<base64 of the C-order bytes>", "dtype": "<f8", "shape": [2, 3]}``
NaN, ±infinity          ``{"__float__": "nan"}``, ``"inf"`` or ``"-inf"`` (JSON has no such numbers)
a numpy scalar          its plain number (``.item()``)
======================  ==========================================================================

``dtype`` is numpy's ``dtype.str`` (byte order, kind, item size); arrays of Python objects and
structured arrays are refused. The tags are reserved: a dict that uses one as a key is refused.

Results exported as JSON lines (``nbqueue results``) use the same encoding; a value it cannot
express (a set, an object) is written as ``{"__repr__": "<repr(value)>"}``, which is output
only: reading it back is refused. ``nbqueue results --pickle`` exports exact values.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BYTES, NDARRAY, FLOAT, REPR = "__bytes__", "__ndarray__", "__float__", "__repr__"
TAGS = frozenset((BYTES, NDARRAY, FLOAT, REPR))
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
#: ``module.path:Qual.name``: identifiers only, so nothing odd reaches importlib.
REF_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

Fallback = Callable[[Any], Any]


@dataclass(frozen=True)
class TaskSpec:
    """One call by reference: ``fn`` is ``"module:qualname"``; insert it like any other task."""

    fn: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


# -- values ----------------------------------------------------------------------------------------
def _numpy_type(value: Any, name: str) -> bool:
    """Is ``value`` a numpy ``name``? Without importing numpy: if it is not loaded, it is not."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, getattr(np, name))


def encode_value(value: Any, fallback: Fallback | None = None, where: str = "value") -> Any:
    """A JSON-encodable form of ``value`` (see the module docstring).

    Args:
        fallback: called with any value the encoding cannot express; without one, such a value
            raises TypeError naming where it was.
        where: how the error names ``value`` (e.g. ``"argument 0"``).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (list, tuple)):
        return [encode_value(v, fallback, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str) or key in TAGS:
                if fallback is not None:
                    return fallback(value)
                problem = "is reserved by the encoding" if key in TAGS else "is not a string"
                raise TypeError(f"{where}: dict key {key!r} {problem}")
            out[key] = encode_value(v, fallback, f"{where}[{key!r}]")
        return out
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if _numpy_type(value, "ndarray") and not value.dtype.hasobject and value.dtype.names is None:
        import numpy as np

        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")
        return {NDARRAY: data, "dtype": value.dtype.str, "shape": list(value.shape)}
    if _numpy_type(value, "generic"):
        item = value.item()
        if type(item) is not type(value):  # longdouble's item() is itself
            return encode_value(item, fallback, where)
    if fallback is not None:
        return fallback(value)
    raise TypeError(
        f"{where} is a {type(value).__name__}: by-reference tasks take JSON values, bytes and numpy arrays"
    )


def export_value(value: Any) -> Any:
    """``encode_value`` for output: what the encoding cannot express becomes ``{"__repr__": ...}``."""
    return encode_value(value, lambda v: {REPR: repr(v)})


def decode_value(data: Any, where: str = "value") -> Any:
    """The value ``encode_value`` encoded; raise ValueError on a malformed or output-only tag."""
    if isinstance(data, list):
        return [decode_value(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        return data
    tags = TAGS.intersection(data)
    if not tags:
        return {key: decode_value(v, f"{where}[{key!r}]") for key, v in data.items()}
    keys = set(data)
    try:
        if keys == {BYTES}:
            return base64.b64decode(data[BYTES], validate=True)
        if keys == {FLOAT}:
            return _FLOATS[data[FLOAT]]
        if keys == {NDARRAY, "dtype", "shape"}:
            return _decode_array(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: malformed {'/'.join(sorted(tags))} value ({exc})") from None
    if keys == {REPR}:
        raise ValueError(f"{where}: a {REPR} value is output only and cannot be read back")
    raise ValueError(f"{where}: an object with {', '.join(sorted(tags))} must have exactly its own keys")


def _decode_array(data: dict) -> Any:
    try:
        import numpy as np
    except ImportError:
        raise ValueError("a numpy array needs numpy installed here") from None
    dtype = np.dtype(data["dtype"])
    if dtype.hasobject or dtype.names is not None:
        raise ValueError(f"dtype {data['dtype']!r} is not a plain numeric or text dtype")
    shape = data["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"shape must be a list of non-negative integers, not {shape!r}")
    raw = base64.b64decode(data[NDARRAY], validate=True)
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise ValueError(f"{len(raw)} bytes do not make an array of shape {shape} and dtype {dtype.str}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # a copy is writable


# -- specs -----------------------------------------------------------------------------------------
def check_ref(ref: Any) -> str:
    """Refuse a function reference that is not ``module:qualname``."""
    if not isinstance(ref, str) or not REF_PATTERN.match(ref):
        raise ValueError(f"fn {ref!r} is not 'module:qualname' (e.g. 'pkg.mod:func')")
    return ref


def parse_spec(obj: Any) -> TaskSpec:
    """A TaskSpec from a decoded JSON spec; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"a task spec is a JSON object, not {type(obj).__name__}")
    unknown = set(obj) - {"fn", "args", "kwargs"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(repr, unknown)))}: use fn, args, kwargs")
    if "fn" not in obj:
        raise ValueError("a task spec needs 'fn': 'module:qualname'")
    args, kwargs = obj.get("args", []), obj.get("kwargs", {})
    if not isinstance(args, list):
        raise ValueError(f"args must be a JSON array, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"kwargs must be a JSON object, not {type(kwargs).__name__}")
    return TaskSpec(
        check_ref(obj["fn"]),
        tuple(decode_value(a, f"argument {i}") for i, a in enumerate(args)),
        {k: decode_value(v, f"argument {k!r}") for k, v in kwargs.items()},
    )


def dumps_spec(spec: TaskSpec) -> bytes:
    """The JSON payload of a spec; TypeError names an argument the encoding cannot express."""
    args = [encode_value(a, where=f"argument {i}") for i, a in enumerate(spec.args)]
    kwargs = {k: encode_value(v, where=f"argument {k!r}") for k, v in spec.kwargs.items()}
    doc = {"fn": spec.fn, "args": args, "kwargs": kwargs}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def loads_spec(payload: bytes) -> TaskSpec:
    """The spec in a by-reference payload; ValueError when it is not one."""
    return parse_spec(json.loads(payload))


# -- functions -------------------------------------------------------------------------------------
def resolve(ref: str) -> Any:
    """Import the object ``module:qualname`` names.

    Raises:
        ValueError: ``ref`` is not ``module:qualname``.
        ImportError: the module cannot be imported here.
        AttributeError: the module has no such name.
    """
    module_name, qualname = check_ref(ref).split(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{module_name} has no {qualname!r}") from None
    return obj


def reference_of(fn: Any) -> str:
    """``module:qualname`` of a function that a worker can import; ValueError if it cannot."""
    ref = f"{fn.__module__}:{fn.__qualname__}"
    if fn.__module__ == "__main__":
        raise ValueError(
            f"{fn.__qualname__}() is defined in __main__ (a notebook or script), which workers cannot "
            "import: move it to an installed module, or drop by_reference to ship it by value"
        )
    if not REF_PATTERN.match(ref):  # '<locals>', '<lambda>'
        raise ValueError(f"{ref} is not importable by name: define it at the top level of a module")
    try:
        found = resolve(ref)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{ref} cannot be imported back: {exc}") from None
    if found is not fn:
        raise ValueError(f"{ref} names another object than this function (redefined or wrapped?)")
    return ref
