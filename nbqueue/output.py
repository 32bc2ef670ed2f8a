"""A task's printed output, kept with its task.

A worker's ``sys.stdout`` and ``sys.stderr`` are replaced (once, and again if something else
replaces them) by a stream that sends each write to the buffer of the task that made it and
everything else to the stream it replaced. Which task made a write is a ``ContextVar``: the task
this thread runs, or the asyncio task awaiting it, so the ``async def`` tasks a worker runs side
by side keep their output apart. A buffer keeps the last ``OUTPUT_LIMIT`` characters (stdout and
stderr interleaved, as a terminal shows them); the worker stores them in the task's record.

What this cannot see: output written to the file descriptors directly (C code, a subprocess the
task starts), output of a ``threading.Thread`` the task starts (a new thread starts outside the
task's context; ``asyncio.to_thread`` copies it, so those threads' output is the task's), and
logging handlers made before the worker started, which hold the stream they were given; all of
it reaches the worker's own terminal, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any, TextIO

from . import defaults

_capturing: contextvars.ContextVar[TaskOutput | None] = contextvars.ContextVar("nbqueue_output", default=None)

#: True: what a task prints also goes to the worker's terminal (``nbqueue worker --echo-output``).
_echo = False


def echo_to_terminal(on: bool) -> None:
    """Also write each task's output to this process's own stdout/stderr (or stop doing so)."""
    global _echo
    _echo = on


class TaskOutput:
    """The last ``limit`` characters a task printed."""

    def __init__(self, limit: int = defaults.OUTPUT_LIMIT) -> None:
        self.limit = limit
        self._parts: deque[str] = deque()
        self._size = 0
        self.dropped = 0  #: characters dropped from the start to stay within the limit
        # A task's context is copied into the threads asyncio.to_thread runs it in: those write here too.
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        """Keep ``text``; drop the oldest characters past the limit."""
        if not text:
            return
        with self._lock:
            self._keep(text)

    def _keep(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        while self._size > self.limit:
            first = self._parts[0]
            excess = self._size - self.limit
            if len(first) <= excess:
                self._parts.popleft()
                self._size -= len(first)
                self.dropped += len(first)
            else:
                self._parts[0] = first[excess:]
                self._size -= excess
                self.dropped += excess

    def text(self) -> str:
        """What was kept, prefixed by a note of how much was dropped before it, if any."""
        with self._lock:
            kept = "".join(self._parts)
        if self.dropped:
            return f"[… {self.dropped:,} earlier characters dropped …]\n{kept}"
        return kept


class _RoutedStream(io.TextIOBase):
    """Stands in for ``sys.stdout`` or ``sys.stderr``: a write made inside a capturing task goes
    to its ``TaskOutput``; any other goes to the stream this one replaced."""

    def __init__(self, real: TextIO) -> None:
        self.real = real

    def write(self, text: str) -> int:
        out = _capturing.get()
        if out is None:
            return self.real.write(text)
        out.write(text)
        if _echo:
            self.real.write(text)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def isatty(self) -> bool:
        return self.real.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)  # buffer, errors, a kernel stream's own attributes


def _install() -> None:
    """Route ``sys.stdout`` and ``sys.stderr`` (again, if something replaced them since)."""
    if not isinstance(sys.stdout, _RoutedStream) and sys.stdout is not None:
        sys.stdout = _RoutedStream(sys.stdout)
    if not isinstance(sys.stderr, _RoutedStream) and sys.stderr is not None:
        sys.stderr = _RoutedStream(sys.stderr)


@contextlib.contextmanager
def captured(limit: int = defaults.OUTPUT_LIMIT) -> Iterator[TaskOutput]:
    """Capture what the code in the block prints (in this context) into a ``TaskOutput``."""
    _install()
    out = TaskOutput(limit)
    reset = _capturing.set(out)
    try:
        yield out
    finally:
        _capturing.reset(reset)
