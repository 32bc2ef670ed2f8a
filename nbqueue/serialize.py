"""The wire format: serializers, signing keys and the signed envelope.

Envelope bytes::

    b"NBQ\\x01" | u32 header length | JSON header | payload | HMAC-SHA256 of everything before

The HMAC is checked before the header is parsed and long before any unpickling, so bytes that
were not made with this queue's key are never loaded. The header names what the bytes are
(``kind``), which task and job they belong to, the function digest and the signing key's id; a
valid envelope copied to another task or job is refused by the id check.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import pickle
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import defaults, pickling
from .errors import BadSignature, DecodeError, SerializationError, SigningKeyError

MAGIC = b"NBQ\x01"
_MAC_SIZE = 32
_PLAIN_SCALARS = (int, float, complex, str, bytes, bool, type(None))


class Serializer(Protocol):
    """Turns Python objects into bytes and back."""

    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _is_plain(obj: Any, depth: int = 0) -> bool:
    """Data that plain pickle ships faithfully: no functions or classes defined in a notebook."""
    if type(obj) in _PLAIN_SCALARS:  # exact types: a notebook's int or str subclass needs dill
        return True
    if depth > 4:
        return False
    if type(obj) in (tuple, list, set, frozenset):
        return len(obj) <= 64 and all(_is_plain(x, depth + 1) for x in obj)
    if type(obj) is dict:
        return len(obj) <= 64 and all(
            _is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in obj.items()
        )
    cls = type(obj)
    return cls.__module__ == "numpy" and cls.__name__ == "ndarray" and not obj.dtype.hasobject


class DillSerializer:
    """dill, shipping by value only what a worker cannot import (see ``pickling``): notebook
    functions, closures and lambdas survive a fresh interpreter, library code travels as a
    reference. Plain data takes a pickle fast path (40× cheaper); dill loads both."""

    name = "dill"

    def dumps(self, obj: Any) -> bytes:
        plain = self.dumps_plain(obj)
        return plain if plain is not None else pickling.dumps(obj)

    def dumps_plain(self, obj: Any) -> bytes | None:
        """The plain pickle of ``obj`` when it is plain data (``dumps``' fast path), else None."""
        if _is_plain(obj):
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return None

    def loads(self, data: bytes) -> Any:
        import dill

        return dill.loads(data)


SERIALIZERS: dict[str, Serializer] = {"dill": DillSerializer()}


def get_serializer(name: str = "dill") -> Serializer:
    """The serializer registered under ``name``."""
    try:
        return SERIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown serializer {name!r}; known: {', '.join(SERIALIZERS)}") from None


# -- keys --------------------------------------------------------------------------------------
#: Shortest signing key accepted (bytes): anything shorter is guessable.
MIN_KEY_BYTES = 16


def load_key() -> bytes:
    """The signing key: ``NBQUEUE_SECRET``, else a per-user key file made 0600 on first use.

    Raises:
        SigningKeyError: the key is too short, or the key file is readable by others or belongs
            to someone else (a key others can read signs nothing).
    """
    secret = os.environ.get(defaults.ENV_SECRET)
    if secret:
        return _checked(secret.encode(), f"${defaults.ENV_SECRET}")
    path = defaults.key_file_path()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        # Write it whole under a temporary name, then link it into place: a process reading at
        # the same moment sees no file or the whole key, never an empty one.
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32).hex().encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
    st = os.stat(path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SigningKeyError(
            f"refusing the signing key {path}: it must be yours and mode 0600 (chmod 600 {path})"
        )
    with open(path, "rb") as f:
        return _checked(f.read().strip(), path)


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise SigningKeyError(f"the signing key in {where} is shorter than {MIN_KEY_BYTES} bytes")
    return key


_keyed_hmacs: dict[bytes, hmac.HMAC] = {}


@dataclass(frozen=True)
class Signer:
    """Signs and verifies envelopes with one key; ``key=None`` is the explicit insecure mode."""

    key: bytes | None

    @classmethod
    def default(cls, insecure: bool = False) -> Signer:
        """The user's signer (or an insecure one, which neither signs nor checks)."""
        return cls(None if insecure else load_key())

    @functools.cached_property
    def key_id(self) -> str | None:
        return None if self.key is None else hashlib.sha256(self.key).hexdigest()[:8]

    def mac(self, body: bytes) -> bytes:
        if self.key is None:
            return b"\0" * _MAC_SIZE
        # Keyed once per key; each mac copies it: cheaper than keying an HMAC per envelope. (Not
        # on the instance: a Signer must stay picklable.)
        keyed = _keyed_hmacs.get(self.key)
        if keyed is None:
            keyed = _keyed_hmacs[self.key] = hmac.new(self.key, digestmod=hashlib.sha256)
        h = keyed.copy()
        h.update(body)
        return h.digest()


#: ``json.dumps(..., separators=(",", ":"))`` without building an encoder per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def seal(signer: Signer, header: dict, payload: bytes) -> bytes:
    """Build a signed envelope."""
    head = _COMPACT_JSON.encode({**header, "k": signer.key_id}).encode()
    body = b"".join((MAGIC, len(head).to_bytes(4, "big"), head, payload))
    return body + signer.mac(body)


def open_envelope(signer: Signer, blob: bytes, kind: str, **expect: Any) -> tuple[dict, bytes]:
    """Verify and split an envelope; ``expect`` fields (e.g. ``t=task_id``) must match.

    Raises:
        DecodeError: the bytes are not an envelope.
        BadSignature: the HMAC does not match, or the envelope belongs elsewhere.
    """
    if len(blob) < len(MAGIC) + 4 + _MAC_SIZE or blob[: len(MAGIC)] != MAGIC:
        raise DecodeError("not an nbqueue envelope (bad magic or too short)")
    body, mac = blob[:-_MAC_SIZE], blob[-_MAC_SIZE:]
    if signer.key is not None and not hmac.compare_digest(signer.mac(body), mac):
        raise BadSignature("bad signature: the bytes were altered or signed with another key")
    size = int.from_bytes(body[4:8], "big")
    try:
        header = json.loads(body[8 : 8 + size])
    except ValueError as exc:
        raise DecodeError(f"unreadable envelope header: {exc}") from None
    if not isinstance(header, dict) or header.get("kind") != kind:
        raise BadSignature(f"envelope is not a {kind}")
    for field, value in expect.items():
        if header.get(field) != value:
            raise BadSignature(
                f"bad signature: envelope was made for {field}={header.get(field)!r}, not {value!r}"
            )
    return header, body[8 + size :]


# -- what is serialized ------------------------------------------------------------------------
def dumps_checked(
    obj: Any, serializer: Serializer, what: str, parts: Callable[[], list[tuple[str, Any]]] | None = None
) -> bytes:
    """Serialize or raise SerializationError naming the part that cannot travel, the path to it
    (``fit_eval → model → _lock``) and what to do instead.

    ``parts()`` names the pieces of ``obj`` (a call's arguments, say) for the path's first step;
    it is called only on failure, so the hot path pays nothing for it.
    The chained dill traceback is kept only with ``$NBQUEUE_DEBUG`` set.
    """
    try:
        return serializer.dumps(obj)
    except Exception as exc:
        culprit = None
        for label, part in parts() if parts is not None else [("", obj)]:
            culprit = pickling.find_culprit(part, serializer.dumps)
            if culprit is not None:
                culprit.path[:0] = [label] if label else []
                break
        detail = culprit.describe() if culprit is not None else f"{type(exc).__name__}: {exc}"
        cause = exc if os.environ.get(defaults.ENV_DEBUG) else None
        raise SerializationError(f"cannot serialize {what}: {detail}") from cause


#: Header key of an envelope whose payload is a plain pickle (``plain_pickle``).
PLAIN_PICKLE = "pp"


def plain_pickle(obj: Any, serializer: Serializer, header: dict) -> bytes | None:
    """The serializer's plain pickle of ``obj``, ``header`` marked (``PLAIN_PICKLE``) so that
    ``loads_marked`` reads it with ``pickle.loads``: it reads it as the serializer would,
    several times cheaper than dill's loader (cold, as a woken worker or a user's next cell
    runs it: 27 against 94 us for a task's arguments). None, and no mark, when ``obj`` is not
    plain data or the serializer has no such path."""
    dumps_plain = getattr(serializer, "dumps_plain", None)
    data = dumps_plain(obj) if dumps_plain is not None else None
    if data is not None:
        header[PLAIN_PICKLE] = 1
    return data


def loads_marked(data: bytes, serializer: Serializer, header: dict) -> Any:
    """Load a payload ``plain_pickle`` (or the serializer) made, as its envelope's ``header``
    says it was made (one without the mark is loaded by the serializer, as before there was one)."""
    if header.get(PLAIN_PICKLE) == 1:
        return pickle.loads(data)
    return serializer.loads(data)


#: The last pickle of each function, with what it depended on (``pickling.fingerprint``):
#: ``fn -> (serializer name, key, objects the key names, digest, blob)``. A notebook submits the
#: same function again and again (one job each); pickling it each time is most of an insert.
_blob_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def function_blob(fn: Any, serializer: Serializer) -> tuple[str, bytes]:
    """Serialize a task function: ``(sha256 digest, bytes)``; the last pickle again while nothing
    it depends on changed (its code, the globals it reads, its defaults and closure)."""
    depends = pickling.fingerprint(fn) if type(fn) is types.FunctionType else None
    if depends is not None:
        known = _blob_cache.get(fn)
        if known is not None and known[0] == serializer.name and known[1] == depends[0]:
            return known[3], known[4]
    blob = dumps_checked(fn, serializer, f"function {getattr(fn, '__qualname__', fn)!r}")
    digest = hashlib.sha256(blob).hexdigest()
    if depends is not None:
        # Not fn itself among the objects kept: the entry must not keep its own key alive.
        kept = [obj for obj in depends[1] if obj is not fn]
        _blob_cache[fn] = (serializer.name, depends[0], kept, digest, blob)
    return digest, blob


def check_function_blob(digest: str, blob: bytes) -> None:
    """A stored function blob must hash to the digest its (signed) task names."""
    if hashlib.sha256(blob).hexdigest() != digest:
        raise BadSignature(f"function blob {digest[:12]}… does not match its digest")
