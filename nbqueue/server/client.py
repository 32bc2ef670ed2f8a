"""From a kernel: find the Jupyter server it runs under, and ask it for workers.

Workers the server owns outlive kernel restarts. The server that launched a kernel is named by
``$JPY_PARENT_PID`` (else it is the kernel's parent process); it lists itself (URL and token) in
Jupyter's runtime directory. This module imports no
jupyter-server code until asked, and uses only the standard library for HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from typing import Any

from ..errors import NbQueueError

log = logging.getLogger("nbqueue.server.client")
#: Queue URLs this kernel has told its server about (``announce_queue``).
_announced: set[str] = set()
_announced_lock = threading.Lock()


def running_server(pid: int | None = None) -> dict[str, Any] | None:
    """The running Jupyter server with this pid (default: the one that launched this kernel, as
    ``$JPY_PARENT_PID`` names it, else this process's parent), or None."""
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        return None
    if pid is None:
        # jupyter_client's launcher sets it for every kernel: right even when a wrapper script
        # (a conda activation, a nanny) stands between the server and the kernel.
        pid = int(os.environ.get("JPY_PARENT_PID") or os.getppid())
    for info in list_running_servers():
        if info.get("pid") == pid and info.get("token"):
            return info
    return None


def _call(info: dict[str, Any], method: str, path: str, body: dict | None = None) -> Any:
    request = urllib.request.Request(
        f"{info['url'].rstrip('/')}/nbqueue/api/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {info['token']}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message") or exc.reason
        except ValueError:
            message = exc.reason
        raise NbQueueError(f"the Jupyter server refused ({exc.code}): {message}") from None
    except OSError as exc:
        raise NbQueueError(f"cannot reach the Jupyter server at {info['url']}: {exc}") from None


def start_server_workers(info: dict[str, Any], queue_url: str, n: int) -> list[int]:
    """Ask the server to start ``n`` workers on ``queue_url`` for a kernel; their pids."""
    return _call(info, "POST", "workers", {"url": queue_url, "n": n, "origin": "kernel"})["pids"]


def kernel_started_workers(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The server's live workers that kernels started (this one or any before a restart)."""
    return [w for w in _call(info, "GET", "workers") if w.get("alive") and w.get("origin") == "kernel"]


def stop_server_workers(info: dict[str, Any], pids: list[int]) -> int:
    """Ask the server to stop these workers; how many it stopped."""
    return sum(_call(info, "DELETE", f"workers/{pid}")["stopped"] for pid in pids)


def announce_queue(url: str) -> None:
    """Tell the Jupyter server this kernel runs under that it uses the queue at ``url``, so the
    server's dashboard lists it: once per URL, in the background (an insert never waits for it),
    and silently when there is no such server. Only in a kernel a Jupyter server started
    (``$JPY_PARENT_PID`` set): a script or a worker asks nothing."""
    if not os.environ.get("JPY_PARENT_PID"):
        return
    with _announced_lock:
        if url in _announced:
            return
        _announced.add(url)
    threading.Thread(target=_announce, args=(url,), name="nbqueue-announce", daemon=True).start()


def _announce(url: str) -> None:
    try:
        info = running_server()
        if info is not None:
            _call(info, "POST", "queues", {"url": url})
    except Exception as exc:  # informative only: the dashboard lacks this queue
        log.debug("could not tell the Jupyter server about %s: %s", url, exc)
