"""What the server extension holds: the queues it shows and the worker processes it owns.

Workers started here are children of the server, not of any kernel, so they survive kernel
restarts; the server stops them when it stops.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field

from ..backends import redact_url
from ..procs import WorkerProcesses
from ..queue import TaskQueue


def queue_id(url: str) -> str:
    """A short stable id for a queue URL, safe in a path (the URL itself may hold a password)."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


@dataclass
class WorkerGroup:
    """Worker processes the server started for one queue."""

    queue: str
    pool: WorkerProcesses
    started: float = field(default_factory=time.time)
    origin: str = "api"  #: who asked: "kernel" (``%queue workers start``), or the API


class QueueRegistry:
    """Queues by id, and the server-owned worker processes."""

    def __init__(
        self, urls: list[str], max_workers: int, idle_exit: float | None, log: logging.Logger
    ) -> None:
        self.max_workers = max_workers
        self.idle_exit = idle_exit
        self.log = log
        self._queues: dict[str, TaskQueue] = {}
        self._groups: list[WorkerGroup] = []
        self._lock = threading.Lock()
        for url in urls:
            try:
                self.add(url)
            except Exception as exc:  # a bad configured URL must not stop the server
                log.error("nbqueue: cannot open queue %s: %s", redact_url(url), exc)

    def add(self, url: str) -> str:
        """Open (once) the queue at ``url``; its id. Raises on a bad URL or unreachable queue."""
        qid = queue_id(url)
        with self._lock:
            if qid not in self._queues:
                self._queues[qid] = TaskQueue(url)
        return qid

    def get(self, qid: str) -> TaskQueue:
        """The queue with this id; KeyError if unknown."""
        return self._queues[qid]

    def items(self) -> list[tuple[str, TaskQueue]]:
        with self._lock:
            return list(self._queues.items())

    # -- workers ---------------------------------------------------------------------------------
    def running(self) -> int:
        return sum(group.pool.alive() for group in self._groups)

    def start_workers(self, qid: str, n: int, origin: str = "api") -> WorkerGroup:
        """Start ``n`` worker processes on a queue, within ``max_workers`` in all; ``origin`` says
        who asked (a kernel's ``%queue workers`` lists and stops those it and its kind started)."""
        tq = self.get(qid)
        with self._lock:
            if self.running() + n > self.max_workers:
                raise ValueError(
                    f"{n} more worker(s) would exceed max_local_workers={self.max_workers} "
                    f"({self.running()} running)"
                )
            pool = tq.spawn_workers(n, idle_exit=self.idle_exit)
            group = WorkerGroup(qid, pool, origin=origin)
            self._groups.append(group)
        self.log.info("nbqueue: started %d worker(s) on %s: %s", n, tq.url, pool.pids)
        return group

    def workers(self) -> list[dict]:
        """Every worker process the server started, alive or not."""
        rows = []
        for group in self._groups:
            for proc in group.pool.procs:
                code = proc.poll()
                rows.append(
                    {
                        "pid": proc.pid,
                        "queue": group.queue,
                        "url": self._queues[group.queue].url,
                        "alive": code is None,
                        "exit_code": code,
                        "started": group.started,
                        "origin": group.origin,
                    }
                )
        return rows

    def stop_workers(self, pid: int | None = None) -> int:
        """Stop one worker by pid, or all of them; how many were stopped."""
        stopped = 0
        for group in list(self._groups):
            procs = [p for p in group.pool.procs if (pid is None or p.pid == pid) and p.poll() is None]
            if procs:
                group.pool.stop(pids=[p.pid for p in procs])
                stopped += len(procs)
        with self._lock:
            self._groups = [g for g in self._groups if g.pool.alive()]
        return stopped

    def stop_all(self) -> None:
        self.stop_workers()
