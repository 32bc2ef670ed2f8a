"""Test helpers: notebook-style definitions and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types


def notebook(source: str) -> types.ModuleType:
    """Run ``source`` as notebook cells run: in a module named ``__main__`` that no worker can
    import, so dill must ship its functions by value."""
    module = types.ModuleType("__main__")
    exec(compile(textwrap.dedent(source), "<notebook>", "exec"), module.__dict__)
    return module


def start_workers(url: str, n: int = 1, *extra: str) -> list[subprocess.Popen]:
    """Start ``n`` real ``nbqueue worker`` processes (one each) on ``url``."""
    cmd = [sys.executable, "-m", "nbqueue", "worker", url, *extra]
    return [subprocess.Popen(cmd, stdin=subprocess.DEVNULL) for _ in range(n)]


def wait_all(procs: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    """Wait for every process; kill stragglers so a failing test never leaks processes."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` as a fresh interpreter's ``__main__``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
    )


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
