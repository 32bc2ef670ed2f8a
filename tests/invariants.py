"""Fault-test harness: a task that logs its side effect, and a checker of the delivery invariants.

A fault test queues ``side_effect`` tasks (notebook source ``EFFECT_SOURCE``), breaks things while
workers run them, lets the queue settle, then calls ``check_invariants``:

- I1 every task has exactly one committed result, and it is a success;
- I2 every task's side effect happened at least once (re-runs are counted, not forbidden: delivery
  is at least once);
- I3 no committed result came from a stale lease: the committed value's (attempt, lease token) is
  a run the log saw for that task, and no logged run of that task has a higher attempt;
- I4 once quiescent, nothing is queued or leased (``TaskQueue.status()``).

The side-effect log is a directory with one append-only file per worker pid; each run appends one
line ``task_id pid attempt lease_token`` with a single ``os.write`` on an ``O_APPEND`` descriptor,
so a SIGKILL leaves whole lines or nothing, never a torn or interleaved one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbqueue import TaskQueue
    from nbqueue.jobs import Job

#: Notebook source of the side-effect task; add it to a test's notebook source (``notebook()``).
#: ``side_effect(log_dir, seconds)`` logs its run, sleeps ``seconds`` and returns
#: ``(task_id, pid, attempt, lease_token)``.
EFFECT_SOURCE = """
import os, time
from nbqueue import current_task, queueable

@queueable
def side_effect(log_dir, seconds=0.0):
    ctx = current_task()
    if ctx is None:
        raise RuntimeError("side_effect must run on a worker: current_task() is None")
    pid = os.getpid()
    line = f"{ctx.task_id} {pid} {ctx.attempt} {ctx.lease_token}\\n".encode()
    fd = os.open(os.path.join(log_dir, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # One write of the whole line: a SIGKILL lands before or after it, never inside.
        if os.write(fd, line) != len(line):
            raise OSError(f"short write to the side-effect log: {line!r}")
    finally:
        os.close(fd)
    time.sleep(seconds)
    return (ctx.task_id, pid, ctx.attempt, ctx.lease_token)
"""


@dataclass(frozen=True)
class Run:
    """One logged execution of a task."""

    task_id: str
    pid: int
    attempt: int
    token: str


def read_runs(log_dir: str | os.PathLike) -> dict[str, list[Run]]:
    """task_id -> its logged runs, in log order per worker. Raises on a malformed line (the log is
    written so that even a SIGKILL cannot leave one)."""
    runs: dict[str, list[Run]] = {}
    for path in sorted(Path(log_dir).iterdir()):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            raise AssertionError(f"side-effect log {path} ends in a partial line: {data[-80:]!r}")
        for n, line in enumerate(data.decode().splitlines(), 1):
            fields = line.split(" ")
            if len(fields) != 4 or not fields[1].isdigit() or not fields[2].isdigit():
                raise AssertionError(f"side-effect log {path}:{n} is malformed: {line!r}")
            run = Run(fields[0], int(fields[1]), int(fields[2]), fields[3])
            if path.name != f"{run.pid}.log":
                raise AssertionError(f"side-effect log {path}:{n} was written by pid {run.pid}: {line!r}")
            runs.setdefault(run.task_id, []).append(run)
    return runs


@dataclass
class InvariantReport:
    """What ``audit`` found. ``violations`` is empty when I1-I4 hold."""

    tasks: int = 0
    executions: int = 0  #: logged runs of the tasks checked
    duplicates: int = 0  #: runs beyond the first, summed over tasks
    lost: int = 0  #: tasks with no committed result
    failed: int = 0  #: tasks whose committed record is an error
    stale_commits: int = 0  #: committed results that fail I3
    unrun: int = 0  #: tasks with no logged run
    counts: object = None  #: TaskQueue.status() when checked
    rerun_tasks: dict[str, list[Run]] = field(default_factory=dict)  #: task_id -> runs, for re-run tasks
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"tasks={self.tasks} executions={self.executions} duplicates={self.duplicates} "
            f"lost={self.lost} failed={self.failed} stale_commits={self.stale_commits} unrun={self.unrun}"
        )

    def describe(self, limit: int = 20) -> str:
        shown = self.violations[:limit]
        more = len(self.violations) - len(shown)
        lines = [f"{len(self.violations)} invariant violation(s); {self.summary()}", *shown]
        if more:
            lines.append(f"... and {more} more")
        return "\n  ".join(lines)


def _as_jobs(jobs: Job | Iterable[Job]) -> list[Job]:
    from nbqueue.jobs import Job

    return [jobs] if isinstance(jobs, Job) else list(jobs)


def audit(
    queue: TaskQueue,
    jobs: Job | Iterable[Job],
    log_dir: str | os.PathLike,
    *,
    quiescent: bool = True,
    limit: int = 20,
) -> InvariantReport:
    """Check I1-I4 for every task of ``jobs`` (all run as ``side_effect``) against the log in
    ``log_dir``; return the report without raising. ``quiescent=False`` skips I4 (for a queue
    that may still be busy). ``limit`` caps the violations recorded per invariant."""
    report = InvariantReport()
    runs = read_runs(log_dir)
    per_invariant: dict[str, int] = {}

    def violate(invariant: str, message: str) -> None:
        per_invariant[invariant] = per_invariant.get(invariant, 0) + 1
        if per_invariant[invariant] <= limit:
            report.violations.append(f"{invariant}: {message}")

    expected: list[str] = []
    records = {}
    for job in _as_jobs(jobs):
        total = job.total
        if total is None:
            violate("I1", f"job {job.id} has no total: its insert did not finish")
            total = job.counts().inserted
        ids = [f"{job.id}-{i}" for i in range(total)]
        expected += ids
        job_records = job.records()
        seen = {record.task_id for record in job_records}
        if len(seen) != len(job_records):
            violate("I1", f"job {job.id} has {len(job_records) - len(seen)} task(s) with two records")
        for task_id in sorted(seen - set(ids)):
            violate("I1", f"job {job.id} has a record for {task_id}, which was never inserted")
        records.update((record.task_id, record) for record in job_records)
    report.tasks = len(expected)
    expected_set = set(expected)

    for task_id in sorted(set(runs) - expected_set):
        violate("I2", f"the log has {len(runs[task_id])} run(s) of {task_id}, which is not a task checked")

    for task_id in expected:
        task_runs = runs.get(task_id, [])
        report.executions += len(task_runs)
        if len(task_runs) > 1:
            report.duplicates += len(task_runs) - 1
            report.rerun_tasks[task_id] = task_runs
        elif not task_runs:
            report.unrun += 1
            violate("I2", f"{task_id} has no logged run (its side effect never happened)")
        record = records.get(task_id)
        # I1: exactly one committed result, and a success.
        if record is None:
            report.lost += 1
            violate("I1", f"{task_id} has no committed result (lost); logged runs: {task_runs}")
            continue
        if not record.ok:
            report.failed += 1
            violate("I1", f"{task_id} committed an error, not a result: {record.error}; runs: {task_runs}")
            continue
        # I3: the committed value is from the newest lease that ran.
        value = record.value
        if not (isinstance(value, tuple) and len(value) == 4):
            report.stale_commits += 1
            violate("I3", f"{task_id} committed {value!r}, not (task_id, pid, attempt, token)")
            continue
        v_task, v_pid, v_attempt, v_token = value
        problems = []
        if v_task != task_id:
            problems.append(f"its value names task {v_task}")
        if record.attempt != v_attempt:
            problems.append(f"record attempt {record.attempt} != the task's attempt {v_attempt}")
        if record.worker is not None and not record.worker.endswith(f":{v_pid}"):
            problems.append(f"record worker {record.worker} did not return pid {v_pid}")
        if Run(task_id, v_pid, v_attempt, v_token) not in task_runs:
            problems.append(f"no logged run is (pid {v_pid}, attempt {v_attempt}, token {v_token})")
        newest = max((r.attempt for r in task_runs), default=0)
        if newest > v_attempt:
            problems.append(f"a later attempt ({newest}) ran after the committed attempt {v_attempt}")
        if problems:
            report.stale_commits += 1
            violate("I3", f"{task_id}: {'; '.join(problems)}; runs: {task_runs}")

    # I4: nothing queued or leased once quiescent.
    counts = queue.status()
    report.counts = counts
    if quiescent and (counts.waiting != 0 or counts.leased != 0):
        # Diagnose before failing: a recount tells tasks really left behind from counters that
        # drifted (rezero rewrites the counters; the queue is failing this check anyway).
        try:
            exact = queue.rezero()
            recount = f"; a recount (rezero) says {exact}"
            if exact.waiting == 0 and exact.leased == 0:
                recount += " -- the counters drifted: no task is really queued or leased"
        except Exception as exc:  # the message matters more than the recount
            recount = f"; the recount failed: {exc!r}"
        violate("I4", f"after quiescence status() is {counts}{recount}")

    for invariant, n in sorted(per_invariant.items()):
        if n > limit:
            report.violations.append(f"{invariant}: ... {n - limit} more violation(s) of {invariant}")
    return report


def check_invariants(
    queue: TaskQueue,
    jobs: Job | Iterable[Job],
    log_dir: str | os.PathLike,
    *,
    quiescent: bool = True,
) -> InvariantReport:
    """``audit`` and assert I1-I4 hold; the report (duplicates counted, not asserted)."""
    report = audit(queue, jobs, log_dir, quiescent=quiescent)
    assert not report.violations, report.describe()
    return report
