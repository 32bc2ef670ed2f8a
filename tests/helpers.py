"""Test helpers: notebook-style definitions and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types

#: Notebook source of an object that holds a lock (process-local: it cannot travel), reached from a
#: task through a notebook helper: ``fit_with -> model -> _lock``.
LOCKED_MODEL_SOURCE = """
import threading

class Model:
    def __init__(self):
        self._lock = threading.Lock()

model = Model()

def fit_with(x):
    return model, x
"""

#: Notebook source of a Canary: unpickling one makes a directory at its path, the proof that bytes
#: were loaded. Tests add it to their notebook source and check the path never appears.
CANARY_SOURCE = """
import os

class Canary:
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (os.mkdir, (self.path,))
"""


def tasks_of(job: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """``n`` storage-level tasks of ``job`` (ids from ``start``), for backend tests."""
    return [(f"{job}-{i}", f"payload {i}".encode()) for i in range(start, start + n)]


def notebook(source: str) -> types.ModuleType:
    """Run ``source`` as notebook cells run: in a module named ``__main__`` that no worker can
    import, so dill must ship its functions by value."""
    module = types.ModuleType("__main__")
    exec(compile(textwrap.dedent(source), "<notebook>", "exec"), module.__dict__)
    return module


def start_workers(url: str, n: int = 1, *extra: str, cwd=None, env=None) -> list[subprocess.Popen]:
    """Start ``n`` real ``nbqueue worker`` processes (one each) on ``url``, in ``cwd`` with
    ``env`` when given (a worker in an empty directory, say)."""
    cmd = [sys.executable, "-m", "nbqueue", "worker", url, *extra]
    return [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=cwd, env=env) for _ in range(n)]


def without_pythonpath() -> dict[str, str]:
    """This environment without PYTHONPATH: a worker that can import only what is installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


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


# -- a real Jupyter server and a real browser -------------------------------------------------------
#: Chromium flags for this closed network: without the background ones it keeps dialling out.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_path() -> str:
    """Debian's Chromium; a test fails (never skips) without it."""
    import shutil

    import pytest

    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not on PATH; install it: apt-get install chromium", pytrace=False)
    return path


class JupyterProcess:
    """``python -m <app>`` (jupyterlab, jupyter_server) on a free loopback port with a token."""

    def __init__(self, app: str, root: str, *extra: str) -> None:
        import socket
        import uuid

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = uuid.uuid4().hex
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(root, f"{app}.log")
        cmd = [
            sys.executable,
            "-m",
            app,
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--port={self.port}",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            *extra,
        ]
        if os.geteuid() == 0:  # CI machines run as root; Jupyter refuses that without this flag
            cmd.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait_ready(self, timeout: float = 60) -> JupyterProcess:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    raise AssertionError(f"Jupyter did not start: {f.read()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- fault tests: soak sizes and lease keepers ------------------------------------------------------
def soak_enabled(config) -> bool:
    """True under ``pytest --soak`` or with $NBQUEUE_SOAK set (to anything but 0/false/no)."""
    if config.getoption("--soak", default=False):
        return True
    return os.environ.get("NBQUEUE_SOAK", "").strip().lower() not in ("", "0", "false", "no", "off")


def soak_size(request_or_config, small, soak):
    """``soak`` under ``--soak`` (or $NBQUEUE_SOAK), ``small`` otherwise (CI). Takes a fixture's
    ``request``, a test item or a pytest config."""
    config = getattr(request_or_config, "config", request_or_config)
    return soak if soak_enabled(config) else small


def keeper_pids(worker_pids) -> list[int]:
    """Live lease-keeper processes (``nbqueue.keeper``) of any of ``worker_pids``, found by scanning
    /proc (a keeper's argv is ``-c CODE LEASE WORKER_PID ...``): keepers whose worker was killed
    are re-parented, so a worker's children list no longer shows them. Zombies count as gone."""
    wanted = {str(pid) for pid in worker_pids}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state == b"Z" or not any("nbqueue.keeper import main" in a for a in argv):
            continue
        args = [a for a in argv if a]
        code = next(i for i, a in enumerate(args) if "nbqueue.keeper import main" in a)
        if len(args) > code + 2 and args[code + 2] in wanted:
            found.append(int(entry))
    return found
