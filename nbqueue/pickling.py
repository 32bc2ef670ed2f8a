"""What travels by value and what by reference, when notebook code is shipped to a worker.

The rule (cloudpickle's, applied with dill): an object goes **by reference** when a worker can
import it: its module is installed (the standard library, site-packages, nbqueue itself, or a
top-level package named in ``$NBQUEUE_BY_REFERENCE``) and ``module.qualname`` resolves to that
very object. Everything else goes **by value**: functions, classes, closures and lambdas defined
in a notebook (``__main__``) or in a local ``.py`` module that is not installed (a helper file
next to the notebook), with exactly the globals their code reads, followed through other by-value
functions only. Library code is never walked, which is what made ``dill.dumps(recurse=True)``
spend seconds in scikit-learn (or hit RecursionError): here ``cross_val_score`` is one reference.

The by-value reducers below are part of the wire format: a worker rebuilds functions, classes
and modules by calling ``make_function``, ``make_class`` and ``make_module`` of this module, so
their names and signatures never change.

Serializing a function also ships the source lines of the cells (or files) it came from, and a
worker registers them in ``linecache``, so a traceback through notebook code shows its lines.
"""

from __future__ import annotations

import builtins
import dataclasses
import dis
import enum
import functools
import importlib
import io
import linecache
import os
import pickle
import sys
import sysconfig
import threading
import types
import typing
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import defaults

#: Source files larger than this are not shipped for tracebacks (a generated module, say).
MAX_SHIPPED_SOURCE = 256 * 1024


# -- where a worker can find an object -------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _install_dirs() -> tuple[str, ...]:
    """Directories whose modules every worker of this environment has: stdlib and site-packages."""
    import site

    dirs = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        dirs.add(user_site)
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs if d}))


def _declared_installed() -> frozenset[str]:
    """Top-level packages the user says workers have installed (``$NBQUEUE_BY_REFERENCE``)."""
    names = os.environ.get(defaults.ENV_BY_REFERENCE, "")
    return frozenset(n.strip() for n in names.split(",") if n.strip())


_installed_cache: dict[str, bool] = {}


def is_installed(module_name: str) -> bool:
    """True when a worker can import ``module_name`` itself: it is part of the standard library,
    lives in site-packages, is nbqueue, or its top-level package is named in
    ``$NBQUEUE_BY_REFERENCE``. A local module (a ``.py`` next to the notebook, an editable
    checkout, a directory on ``PYTHONPATH``) is not: what it defines travels by value.
    """
    known = _installed_cache.get(module_name)
    if known is not None:
        return known
    root = module_name.partition(".")[0]
    if module_name == "__main__":
        answer = False
    elif root in sys.stdlib_module_names or root in sys.builtin_module_names or root == "nbqueue":
        answer = True
    elif root in _declared_installed():
        answer = True
    else:
        module = sys.modules.get(module_name)
        if module is None:
            return False  # not imported (yet): decide, and cache, once it is
        file = getattr(module, "__file__", None)
        paths: list[str] = [file] if isinstance(file, str) else list(getattr(module, "__path__", []))
        dirs = _install_dirs()
        answer = bool(paths) and all(os.path.realpath(p).startswith(dirs) for p in paths)
    _installed_cache[module_name] = answer
    return answer


def _resolve(module_name: str, qualname: str) -> Any:
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def by_reference(obj: Any) -> bool:
    """True when ``obj`` (a function or class) can travel as ``module.qualname``."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return False  # no name, or a closure / lambda / function defined inside another
    if not is_installed(module_name) or module_name not in sys.modules:
        return False
    try:
        return _resolve(module_name, qualname) is obj
    except AttributeError:
        return False


# -- what a function's code reads ------------------------------------------------------------------
_globals_of_code: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_names_of_code: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Opcodes that look a name up in (or bind it to) the globals; LOAD_NAME and friends are what a
#: class body defined inside a function uses.
_GLOBAL_OPS = frozenset(
    dis.opmap[op]
    for op in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME", "STORE_NAME", "DELETE_NAME")
    if op in dis.opmap
)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    return (const for const in code.co_consts if isinstance(const, types.CodeType))


def global_names(code: types.CodeType) -> frozenset[str]:
    """Every name the code (and the code nested in it: inner functions, comprehensions) looks up
    as a global; only those present in the globals travel. Attribute names do not count:
    ``obj.data`` must not ship a notebook global that happens to be called ``data``."""
    names = _globals_of_code.get(code)
    if names is None:
        found = {ins.argval for ins in dis.get_instructions(code) if ins.opcode in _GLOBAL_OPS}
        for inner in _nested(code):
            found |= global_names(inner)
        names = _globals_of_code[code] = frozenset(found)
    return names


def _all_names(code: types.CodeType) -> frozenset[str]:
    """Global and attribute names of the code and the code nested in it."""
    names = _names_of_code.get(code)
    if names is None:
        found = set(code.co_names)
        for inner in _nested(code):
            found |= _all_names(inner)
        names = _names_of_code[code] = frozenset(found)
    return names


def _submodules(code: types.CodeType, values: list[Any]) -> list[types.ModuleType]:
    """Submodules the code reaches by attribute (``sklearn.metrics.f1_score`` after ``import
    sklearn``): a worker importing only ``sklearn`` would lack ``sklearn.metrics``."""
    names = _all_names(code)
    found = []
    for value in values:
        if not isinstance(value, types.ModuleType):
            continue
        prefix = value.__name__ + "."
        for name, module in list(sys.modules.items()):
            if module is not None and name.startswith(prefix):
                if all(part in names for part in name[len(prefix) :].split(".")):
                    found.append(module)
    return found


def _last_line(code: types.CodeType) -> int:
    last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            last = max(last, _last_line(const))
    return last


def _source_of(code: types.CodeType) -> tuple[str, int, list[str]] | None:
    """The function's own lines of the cell (or local file) it was written in, for tracebacks
    on the worker: ``(filename, first line number, lines)``. Library files are never shipped."""
    filename = code.co_filename
    if os.path.realpath(filename).startswith(_install_dirs()):
        return None
    lines = linecache.getlines(filename)
    if not lines:
        return None
    first = code.co_firstlineno
    # A decorated function's code starts at its def; take its decorators too.
    while first > 1 and lines[first - 2].lstrip().startswith("@"):
        first -= 1
    own = lines[first - 1 : _last_line(code)]
    return (filename, first, own) if sum(map(len, own)) <= MAX_SHIPPED_SOURCE else None


# -- the worker side: rebuilding what travelled by value -----------------------------------------
def make_function(
    code: types.CodeType, globals_: dict, name: str, cells: tuple[types.CellType, ...] | None
) -> types.FunctionType:
    """A function shell; ``set_function_state`` fills in its globals, closure and attributes."""
    globals_.setdefault("__builtins__", builtins.__dict__)
    return types.FunctionType(code, globals_, name, None, cells)


def set_function_state(fn: types.FunctionType, state: dict) -> None:
    """Finish a function made by ``make_function`` (after everything it refers to exists)."""
    fn.__globals__.update(state["globals"])
    for index, value in state["closure"]:
        fn.__closure__[index].cell_contents = value  # type: ignore[index]
    fn.__defaults__ = state["defaults"]
    fn.__kwdefaults__ = state["kwdefaults"]
    fn.__qualname__ = state["qualname"]
    fn.__module__ = state["module"]
    fn.__doc__ = state["doc"]
    fn.__annotations__ = state["annotations"]
    fn.__dict__.update(state["dict"])
    if state.get("source") is not None:
        _register_source(*state["source"])


#: Lines of notebook cells known on this worker, by cell file name (only what functions brought).
_sources: dict[str, list[str]] = {}


def _register_source(filename: str, first: int, lines: list[str]) -> None:
    """Put a shipped function's lines where ``linecache`` (so every traceback) finds them."""
    if os.path.exists(filename):
        return  # the worker has the file itself
    known = _sources.setdefault(filename, [])
    end = first - 1 + len(lines)
    if len(known) < end:
        known.extend("\n" for _ in range(end - len(known)))
    known[first - 1 : end] = lines
    # An entry without a modification time is never dropped by linecache.checkcache.
    linecache.cache[filename] = (sum(map(len, known)), None, known, filename)


#: Classes rebuilt on this worker, by the id their producer gave them: the class a function
#: refers to and the class of an argument are one class, so ``isinstance`` holds across them.
_classes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_classes_lock = threading.Lock()


def make_class(class_id: str, metaclass: type, name: str, bases: tuple, namespace: dict) -> type:
    """A class shell (or the one already rebuilt under ``class_id``); ``set_class_state`` fills it."""
    with _classes_lock:
        cls = _classes.get(class_id)
        if cls is None:
            cls = types.new_class(name, bases, {"metaclass": metaclass}, lambda ns: ns.update(namespace))
            _classes[class_id] = cls
            # A result holding an instance travels back under the same id, so the notebook
            # finds its own class again.
            _class_ids[cls] = class_id
    return cls


def make_typevar(
    name: str, bound: Any, constraints: tuple, covariant: bool, contravariant: bool
) -> typing.TypeVar:
    """A TypeVar defined in a notebook (its own pickle names it as ``__main__.T``)."""
    return typing.TypeVar(name, *constraints, bound=bound, covariant=covariant, contravariant=contravariant)


def make_cached_property(func: Callable[..., Any], attrname: str | None) -> functools.cached_property:
    """A ``functools.cached_property`` (whose own pickle would carry a lock on Python < 3.12)."""
    prop = functools.cached_property(func)
    prop.attrname = attrname
    return prop


def set_class_state(cls: type, state: dict) -> None:
    """Set a rebuilt class's attributes: methods, class variables, dataclass fields."""
    for key, value in state.items():
        setattr(cls, key, value)


def make_module(name: str) -> types.ModuleType:
    """A local module that travelled by value (a worker may not have its file)."""
    return types.ModuleType(name)


def set_module_state(module: types.ModuleType, state: dict) -> None:
    """Fill a module made by ``make_module``."""
    vars(module).update(state)


# -- the producer side --------------------------------------------------------------------------------
@functools.cache
def _process_local_types() -> tuple[type, ...]:
    """Objects that mean nothing in another process. dill would copy them (a lock arrives as a
    fresh lock that guards nothing), so they are refused instead."""
    return (
        type(threading.Lock()),
        type(threading.RLock()),
        threading.Condition,
        threading.Thread,
        io.FileIO,
        io.BufferedReader,
        io.BufferedWriter,
        io.BufferedRandom,
        io.TextIOWrapper,
    )


class Unshippable(TypeError):
    """An object that cannot travel to a worker, with the reason and what to do instead."""

    def __init__(self, obj: Any, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.obj = obj
        self.reason = reason
        self.fix = fix


#: What to do instead, for objects dill cannot pickle, by type name.
_FIXES = {
    "socket": "connect inside the task function",
    "generator": "pass a list, or create the generator inside the task function",
    "Connection": "connect inside the task function",
    "Cursor": "connect inside the task function",
    "SSLContext": "create it inside the task function",
}


def fix_for(obj: Any) -> str | None:
    """What to do instead of shipping ``obj``, when nbqueue knows."""
    problem = refusal(obj)
    return problem.fix if problem is not None else _FIXES.get(type(obj).__name__)


def refusal(obj: Any) -> Unshippable | None:
    """Why ``obj`` itself can never travel, or None."""
    if isinstance(obj, _process_local_types()):
        kind = type(obj).__name__
        if isinstance(obj, io.IOBase):
            return Unshippable(
                obj,
                f"an open file ({kind}) belongs to this process",
                "pass its path and open it inside the task",
            )
        return Unshippable(obj, f"a {kind} belongs to this process", "create it inside the task function")
    if isinstance(obj, enum.EnumMeta) and not by_reference(obj):
        return Unshippable(
            obj,
            f"the Enum {obj.__qualname__} is defined in the notebook; an Enum class cannot be rebuilt",
            "define it in an installed module, or pass its members' values",
        )
    return None


_SKIPPED_CLASS_ATTRS = frozenset(
    {"__dict__", "__weakref__", "__module__", "__qualname__", "_abc_impl", "__slots__"}
)
_FIELD_TYPE = getattr(dataclasses, "_FIELD_BASE", None)
#: Ids given to classes that travel by value (see ``make_class``), kept while the class lives.
_class_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Shipment:
    """What serializing an object shipped: by value (with sizes, where measured) and by reference."""

    what: str
    nbytes: int = 0
    seconds: float = 0.0
    by_value: dict[str, str] = field(default_factory=dict)  #: qualified name -> kind
    by_reference: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  #: global name -> bytes of its own

    def summary(self) -> str:
        """One line: the total and what went each way."""

        def sized(name: str) -> str:
            size = self.sizes.get(name.rpartition(".")[2])
            return f"{name} ({_kb(size)})" if size is not None else name

        # Code by its qualified name, then the data globals the function reads, by name.
        code_names = {name.rpartition(".")[2] for name in self.by_value}
        data = [f"{name} ({_kb(size)})" for name, size in self.sizes.items() if name not in code_names]
        value = ", ".join([*(sized(n) for n in self.by_value), *data]) or "nothing"
        refs = ", ".join(self.by_reference) or "nothing"
        return (
            f"{self.what}: {_kb(self.nbytes)} in {self.seconds * 1000:.0f} ms; by value: {value}; "
            f"by reference: {refs}"
        )

    def __str__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.summary())


def _kb(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KB"


def _qualified(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = str(getattr(obj, "__module__", None) or getattr(obj, "__name__", "?"))
    qualname = getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if qualname else module


#: Modules whose names in a pickle are the machinery of rebuilding, left out of ``explain``.
_PLUMBING = frozenset({"nbqueue", "dill", "builtins", "copyreg", "types", "functools", "importlib"})

_pickler_class: type | None = None


def pickler_class() -> type:
    """The dill Pickler that applies the rule above (dill is imported on first use)."""
    global _pickler_class
    if _pickler_class is not None:
        return _pickler_class
    import dill

    class ShippingPickler(dill.Pickler):
        def __init__(self, file: io.BytesIO, shipment: Shipment | None = None) -> None:
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL, recurse=False, byref=False)
            self.shipment = shipment
            self._globals: dict[int, tuple[dict, dict]] = {}  # id(original) -> (original, shipped)
            self._cells: dict[int, tuple[types.CellType, types.CellType]] = {}

        def reducer_override(self, obj: Any) -> Any:
            kind = type(obj)
            if kind is types.FunctionType:
                return self._function(obj)
            if isinstance(obj, type):
                return self._class(obj)
            if kind is types.ModuleType:
                return self._module(obj)
            if kind is _FIELD_TYPE:  # dataclasses' sentinels must stay themselves
                return getattr, (dataclasses, obj.name)
            if kind is functools.cached_property:
                return make_cached_property, (obj.func, obj.attrname)
            if kind is typing.TypeVar and not is_installed(getattr(obj, "__module__", "__main__")):
                variance = (obj.__covariant__, obj.__contravariant__)
                return make_typevar, (obj.__name__, obj.__bound__, obj.__constraints__, *variance)
            problem = refusal(obj)
            if problem is not None:
                raise problem
            return NotImplemented

        def _note(self, obj: Any, kind: str, value: bool) -> None:
            if self.shipment is None:
                return
            name = _qualified(obj)
            if not value and name.partition(".")[0] in _PLUMBING:
                return  # how things are rebuilt, not what the user's code uses
            (self.shipment.by_value if value else self.shipment.by_reference)[name] = kind

        def _function(self, fn: types.FunctionType) -> Any:
            if by_reference(fn):
                self._note(fn, "function", False)
                return NotImplemented
            self._note(fn, "function", True)
            code = fn.__code__
            original = fn.__globals__
            # Functions of one module share one globals dict on the worker, as they do here.
            known = self._globals.get(id(original))
            if known is None:
                known = self._globals[id(original)] = (original, {"__name__": original.get("__name__")})
            shipped_globals = known[1]
            names = global_names(code)
            reads = {name: original[name] for name in names if name in original and name != "__builtins__"}
            cells = None
            closure: list[tuple[int, Any]] = []
            if fn.__closure__ is not None:
                placeholders = []
                for index, cell in enumerate(fn.__closure__):
                    # One empty placeholder per original cell keeps cells shared between closures
                    # shared; the contents follow in the state, after the function exists.
                    pair = self._cells.get(id(cell))
                    if pair is None:
                        pair = self._cells[id(cell)] = (cell, types.CellType())
                    placeholders.append(pair[1])
                    try:
                        closure.append((index, cell.cell_contents))
                    except ValueError:
                        pass  # an empty cell stays empty
                cells = tuple(placeholders)
            state = {
                "globals": reads,
                "closure": closure,
                "defaults": fn.__defaults__,
                "kwdefaults": fn.__kwdefaults__,
                "qualname": fn.__qualname__,
                "module": fn.__module__,
                "doc": fn.__doc__,
                "annotations": fn.__annotations__,
                "dict": dict(fn.__dict__),
                "submodules": _submodules(code, [*reads.values(), *(v for _, v in closure)]),
                "source": _source_of(code),
            }
            return (
                make_function,
                (code, shipped_globals, fn.__name__, cells),
                state,
                None,
                None,
                set_function_state,
            )

        def _class(self, cls: type) -> Any:
            if by_reference(cls) or cls.__module__ == "builtins":
                self._note(cls, "class", False)
                return NotImplemented
            problem = refusal(cls)
            if problem is not None:
                raise problem
            self._note(cls, "class", True)
            namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            attrs = vars(cls)
            slots = attrs.get("__slots__")
            if slots is not None:
                namespace["__slots__"] = slots
                slots = (slots,) if isinstance(slots, str) else tuple(slots)
            state = {
                k: v for k, v in attrs.items() if k not in _SKIPPED_CLASS_ATTRS and k not in (slots or ())
            }
            class_id = _class_ids.get(cls)
            if class_id is None:
                class_id = _class_ids[cls] = uuid.uuid4().hex
                _classes[class_id] = cls  # so a result holding one comes back as this class
            # A Generic[T] subclass is rebuilt from what it was written with (its __orig_bases__):
            # typing refuses a plain Generic among the bases. A NamedTuple's are not bases.
            bases = cls.__bases__
            if "__orig_bases__" in attrs and typing.Generic in cls.__mro__:
                bases = attrs["__orig_bases__"]
            args = (class_id, type(cls), cls.__name__, bases, namespace)
            return make_class, args, state, None, None, set_class_state

        def _module(self, module: types.ModuleType) -> Any:
            name = module.__name__
            if name == "__main__":
                raise Unshippable(
                    module, "the notebook's own module cannot travel", "refer to the names you need"
                )
            if is_installed(name):
                self._note(module, "module", False)
                return importlib.import_module, (name,)
            self._note(module, "module", True)
            state = {
                k: v
                for k, v in vars(module).items()
                if k not in ("__builtins__", "__loader__", "__spec__", "__cached__")
            }
            return make_module, (name,), state, None, None, set_module_state

    _pickler_class = ShippingPickler
    return ShippingPickler


def dumps(obj: Any, shipment: Shipment | None = None) -> bytes:
    """Pickle ``obj`` by the rule above; ``shipment`` (if given) records what went which way.

    Raises:
        Unshippable: an object that can never travel (a lock, an open file, a notebook Enum).
        Exception: whatever dill raises for anything else it cannot pickle.
    """
    import dill

    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dill.PicklingWarning)
        pickler_class()(buf, shipment).dump(obj)
    # dill warns, then pickles by reference, when it cannot ship an object by value: no worker
    # could load that, so it is an error here, at insert.
    trouble = [w for w in caught if issubclass(w.category, dill.PicklingWarning)]
    if trouble:
        raise TypeError(f"dill cannot ship it by value: {trouble[-1].message}")
    return buf.getvalue()


# -- when a function's pickle can be reused ---------------------------------------------------------
#: Plain values a fingerprint holds by value: equal ones pickle alike.
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes)
#: Bigger tuples, dicts and deeper nesting are not worth fingerprinting: the function is pickled.
_FINGERPRINT_MAX_ITEMS = 64
_FINGERPRINT_MAX_DEPTH = 6


#: Partials whose pickle never changes while they live (see ``fixed``), by id.
_fixed: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def fixed(part: functools.partial) -> functools.partial:
    """Tell fingerprints that ``part`` pickles alike for as long as it lives (its function and
    arguments cannot be rebound), so they need not walk it: ``queueable`` attaches four to every
    function (``fn.submit`` is ``partial(submit, fn)``), and walking them was a third of a
    fingerprint. Returns ``part``."""
    _fixed[id(part)] = part
    return part


class _Unsure(Exception):
    """A value whose pickle could change while the object stays the same (a list, say)."""


def fingerprint(fn: types.FunctionType) -> tuple[tuple, list[Any]] | None:
    """What ``dumps(fn)`` depends on, as ``(key, objects)``: two equal keys pickle alike as long as
    ``objects`` (held by the caller, so the ids in the key stay theirs) are alive. None when the
    function reads something that could change in place (a list, a notebook class): such a
    function is pickled every time, as its pickle captures that state as it is now.

    Held by identity: code, modules and functions or classes that travel by reference. By value:
    numbers, strings, bytes and tuples of them. Notebook functions it calls: their own
    fingerprints. An import anywhere changes the key of a function that reads a module, since the
    pickle names the submodules its code reaches (``_submodules``).
    """
    objects: list[Any] = []
    try:
        return _function_key(fn, objects, set(), 0), objects
    except (_Unsure, RecursionError):
        return None


def _function_key(fn: types.FunctionType, objects: list[Any], visiting: set[int], depth: int) -> tuple:
    if id(fn) in visiting:
        return ("again", id(fn))  # a recursive helper: its key is being made
    visiting.add(id(fn))
    objects.append(fn)
    code, globs = fn.__code__, fn.__globals__
    objects.append(code)
    reads = tuple(
        (name, _value_key(globs[name], objects, visiting, depth + 1) if name in globs else ("absent",))
        for name in sorted(global_names(code))
        if name != "__builtins__"
    )
    closure = ()
    if fn.__closure__ is not None:
        cells = []
        for cell in fn.__closure__:
            try:
                cells.append(_value_key(cell.cell_contents, objects, visiting, depth + 1))
            except ValueError:
                cells.append(("empty",))
        closure = tuple(cells)
    parts = (
        "fn",
        id(code),
        fn.__name__,
        fn.__qualname__,
        fn.__module__,
        globs.get("__name__"),
        _value_key(fn.__doc__, objects, visiting, depth + 1),
        reads,
        closure,
        _value_key(fn.__defaults__, objects, visiting, depth + 1),
        _mapping_key(fn.__kwdefaults__, objects, visiting, depth + 1),
        _mapping_key(fn.__annotations__, objects, visiting, depth + 1),
        _mapping_key(fn.__dict__, objects, visiting, depth + 1),
    )
    return parts


def _mapping_key(mapping: dict | None, objects: list[Any], visiting: set[int], depth: int) -> tuple | None:
    if mapping is None:
        return None
    if len(mapping) > _FINGERPRINT_MAX_ITEMS or not all(isinstance(k, str) for k in mapping):
        raise _Unsure
    return tuple((k, _value_key(mapping[k], objects, visiting, depth)) for k in sorted(mapping))


def _value_key(value: Any, objects: list[Any], visiting: set[int], depth: int) -> Any:
    if depth > _FINGERPRINT_MAX_DEPTH:
        raise _Unsure
    kind = type(value)
    if kind in _PLAIN_TYPES:
        # repr tells 0.0 from -0.0 (equal, but pickled apart); nan equals itself this way too
        return (kind.__name__, repr(value) if kind is float or kind is complex else value)
    if kind is tuple:
        if len(value) > _FINGERPRINT_MAX_ITEMS:
            raise _Unsure
        return ("tuple", *(_value_key(v, objects, visiting, depth + 1) for v in value))
    if kind is types.FunctionType:
        if by_reference(value):
            objects.append(value)
            return ("ref", id(value))
        return _function_key(value, objects, visiting, depth + 1)
    if kind is functools.partial:  # what @queueable adds: ``fn.submit = partial(submit, fn)``
        if value.__dict__:
            raise _Unsure
        if _fixed.get(id(value)) is value:
            objects.append(value)
            return ("fixed", id(value))
        return (
            "partial",
            _value_key(value.func, objects, visiting, depth + 1),
            _value_key(value.args, objects, visiting, depth + 1),
            _mapping_key(value.keywords, objects, visiting, depth + 1),
        )
    if kind is types.ModuleType:
        if not is_installed(value.__name__):
            raise _Unsure  # a local module travels with its current contents
        objects.append(value)
        return ("module", id(value), len(sys.modules))
    if kind is types.BuiltinFunctionType:
        if not isinstance(value.__self__, types.ModuleType | None):
            raise _Unsure  # a bound method of an object (``items.append``) travels with it
        objects.append(value)
        return ("ref", id(value))
    if isinstance(value, type):
        if not (by_reference(value) or value.__module__ == "builtins"):
            raise _Unsure  # a notebook class: its attributes can change in place
        objects.append(value)
        return ("ref", id(value))
    raise _Unsure


# -- finding the culprit --------------------------------------------------------------------------
def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """The named parts of ``obj`` a pickle of it would contain, for the culprit search."""
    if type(obj) is types.FunctionType:
        if by_reference(obj):
            return
        for name in sorted(global_names(obj.__code__)):
            if name in obj.__globals__:
                yield name, obj.__globals__[name]
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield name, cell.cell_contents
            except ValueError:
                pass
        for i, value in enumerate(obj.__defaults__ or ()):
            yield f"default {i}", value
        return
    if isinstance(obj, type):
        if not by_reference(obj):
            yield from ((k, v) for k, v in vars(obj).items() if k not in _SKIPPED_CLASS_ATTRS)
        return
    if isinstance(obj, types.ModuleType):
        if not is_installed(obj.__name__):
            yield from vars(obj).items()
        return
    if isinstance(obj, functools.partial):
        yield "func", obj.func
        yield from ((f"[{i}]", v) for i, v in enumerate(obj.args))
        yield from ((k, v) for k, v in obj.keywords.items())
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        yield from ((f"[{i}]", v) for i, v in enumerate(obj))
        return
    if isinstance(obj, dict):
        yield from ((f"[{k!r}]", v) for k, v in obj.items())
        return
    yield "__class__", type(obj)
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        yield from state.items()


@dataclass
class Culprit:
    """The innermost part of an object that cannot be pickled: the path to it (``["fit_eval",
    "model", "_lock"]`` reads "the global fit_eval, its attribute model, that one's _lock"), the
    part itself and the error pickling it raised."""

    path: list[str]
    obj: Any
    error: BaseException

    def describe(self) -> str:
        """``fit_eval → model → _lock: a lock belongs to this process …; create it inside …``."""
        where = " → ".join(self.path)
        if isinstance(self.error, Unshippable):
            text = f"{self.error.reason} and cannot travel to a worker; {self.error.fix}"
        else:
            text = f"{type(self.obj).__name__} ({type(self.error).__name__}: {self.error})"
            fix = fix_for(self.obj)
            if fix:
                text += f"; {fix}"
        return f"{where}: {text}" if where else text


def find_culprit(obj: Any, dump: Any = dumps, limit: int = 12) -> Culprit | None:
    """The innermost part of ``obj`` that cannot be pickled (None when ``obj`` pickles)."""
    try:
        dump(obj)
        return None
    except Exception as exc:
        culprit = Culprit([], obj, exc)
    seen = {id(obj)}
    while len(culprit.path) < limit:
        for name, part in _parts(culprit.obj):
            if id(part) in seen:
                continue
            try:
                dump(part)
            except Exception as exc:
                seen.add(id(part))
                culprit = Culprit([*culprit.path, name], part, exc)
                break
        else:
            break  # every part pickles alone: the trouble is this object itself
    return culprit


def explain(fn: Any) -> Shipment:
    """What serializing ``fn`` ships: which names travel by value (with the size of each global
    the function reads) and which by reference, the total size and the time it took.

    ``print(nbqueue.explain(score))``, or ``tq.insert(..., explain=True)`` for each job's function.
    """
    import time

    shipment = Shipment(getattr(fn, "__qualname__", None) or repr(fn))
    started = time.perf_counter()
    shipment.nbytes = len(dumps(fn, shipment))
    shipment.seconds = time.perf_counter() - started
    if type(fn) is types.FunctionType and not by_reference(fn):
        for name in sorted(global_names(fn.__code__)):
            value = fn.__globals__.get(name)
            if name in fn.__globals__ and not isinstance(value, types.ModuleType) and not by_reference(value):
                shipment.sizes[name] = len(dumps(value))
    return shipment
