"""Storage backends, chosen by URL scheme.

``open_backend("fq://./q")`` → FileBackend, ``"mem://name"`` → the shared MemoryBackend,
``"redis://host:port/db?queue=name"`` (or ``rediss://``) → RedisBackend. A bare path means fq://.
Backends are imported only when their scheme is used, so ``import nbqueue`` needs no redis.
"""

from __future__ import annotations

import importlib

from ..errors import QueueURLError
from .base import Backend, Counts, DeadLetter, Lease, TaskInfo, TaskStatus

# scheme -> "module:factory"; a factory takes the full URL and returns a Backend.
SCHEMES: dict[str, str] = {
    "fq": "nbqueue.backends.file:open_file",
    "mem": "nbqueue.backends.memory:open_memory_url",
    "redis": "nbqueue.backends.redis:open_redis",
    "rediss": "nbqueue.backends.redis:open_redis",
}


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: safe to show, log or return."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def split_scheme(url: str) -> tuple[str, str]:
    """``"fq://x"`` → ``("fq", "x")``; a bare path is fq://."""
    if not isinstance(url, str) or not url:
        raise QueueURLError(f"queue URL must be a non-empty string, not {url!r}")
    if "://" not in url:
        return "fq", url
    scheme, rest = url.split("://", 1)
    return scheme.lower(), rest


def open_backend(url: str) -> Backend:
    """Open the backend a queue URL names."""
    scheme, _ = split_scheme(url)
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise QueueURLError(f"unknown queue scheme {scheme + '://'!r} in {url!r}; use one of {known}")
    module_name, factory = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, factory)(url if "://" in url else f"fq://{url}")


__all__ = [
    "Backend",
    "Counts",
    "DeadLetter",
    "Lease",
    "TaskInfo",
    "TaskStatus",
    "open_backend",
    "redact_url",
    "split_scheme",
]
