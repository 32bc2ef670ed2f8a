"""``QueueConnection``: a queue URL opened into its backend, signer and serializer.

What every layer above needs to talk to one queue, and no more: ``TaskQueue`` builds the user's
verbs on it, the insert pipeline writes through it, workers lease through it, and a spawned child
(an insert slice, a local worker) reopens the same queue from ``reopen_args()``.
"""

from __future__ import annotations

import os
from typing import TypeVar

from . import defaults
from .backends import open_backend
from .backends.base import Backend
from .errors import QueueURLError
from .serialize import Serializer, Signer, get_serializer

C = TypeVar("C", bound="QueueConnection")


class QueueConnection:
    """A queue reached by URL: ``fq://PATH``, ``redis://host:port/db?queue=NAME``, ``mem://NAME``.

    Args:
        url: the queue; defaults to ``$NBQUEUE_URL``. A bare path means fq://.
        insecure: neither sign nor check signatures (only for queues no one else can write).
        serializer: name of the serializer for tasks and results.

    Raises:
        QueueURLError: no URL, or one no backend understands.
    """

    def __init__(self, url: str | None = None, *, insecure: bool = False, serializer: str = "dill") -> None:
        url = url or os.environ.get(defaults.ENV_URL)
        if not url:
            raise QueueURLError(f"no queue URL given and ${defaults.ENV_URL} is not set")
        self.backend: Backend = open_backend(url)
        self.url: str = self.backend.url
        self._open_url = url
        self.insecure = insecure
        self.signer = Signer.default(insecure)
        self.serializer: Serializer = get_serializer(serializer)
        # Digests of the function blobs this process stored, per queue identity: a blob is kept
        # until the queue is purged (which gives it a new identity), so an insert of a function
        # already stored skips writing it again.
        self._stored_functions: dict[str, set[str]] = {}
        self._recent_queue_id: str | None = None

    def stored_functions(self, queue_id: str) -> set[str]:
        """The digests this process stored in the queue while it had identity ``queue_id``
        (callers add to it once a blob is written)."""
        return self._stored_functions.setdefault(queue_id, set())

    @property
    def worker_url(self) -> str:
        """The URL another process opens this queue by: fq:// with its absolute path (a process
        started elsewhere, such as the Jupyter server, resolves a relative one against its own
        directory); any other URL as given, password included, to travel out of sight of ``ps``."""
        return self.url if self.url.startswith("fq://") else self._open_url

    @property
    def queue_id(self) -> str:
        """The queue's identity (``Backend.queue_id``), read now: tasks are signed for it.

        Not cached: another process may purge the queue, which gives it a new identity.
        """
        self._recent_queue_id = self.backend.queue_id()
        return self._recent_queue_id

    def recent_queue_id(self) -> str:
        """The queue's identity as this process read it last (read now the first time).

        For a write fenced with it (``Backend.insert(queue_id=)``), which the storage refuses if
        the identity changed since: that saves an insert the round trip of reading it.
        """
        return self._recent_queue_id or self.queue_id

    def reopen_args(self) -> tuple[str, bool, str]:
        """What a spawned child needs to open this queue again (``QueueConnection(*args)``)."""
        return self.worker_url, self.insecure, self.serializer.name

    @classmethod
    def reopen(cls, args: tuple[str, bool, str]) -> QueueConnection:
        """Open the queue ``reopen_args()`` described (in a child process)."""
        url, insecure, serializer = args
        return cls(url, insecure=insecure, serializer=serializer)

    def close(self) -> None:
        """Close the backend's connections."""
        self.backend.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
