"""Steering a job with real worker processes on fq:// and redis://: cancel (waiting tasks never
start, running ones are told, a task deaf to it has its process killed after the grace period).

Latencies are measured from the ``cancel()`` call to the moment no task of the job runs, at the
default settings, and printed (``-s``) for the record.
"""

from __future__ import annotations

import functools
import time

import pytest

from nbqueue import Cancelled, TaskQueue, defaults, use
from nbqueue.backends.base import TaskStatus

from .helpers import notebook, start_workers, wait_all, wait_for

NOTEBOOK = """
import os, time
import numpy as np
from nbqueue import queueable, Cancelled

@queueable
def simulate(i, seconds):
    # A pure-Python Monte Carlo loop: told to stop between two steps.
    rng, total, end = np.random.default_rng(i), 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        total += float(rng.normal())
    return i, total

@queueable
def simulate_and_clean_up(i, path):
    try:
        while True:
            sum(range(1000))
    except Cancelled:
        with open(path, "w") as f:  # what a task does on its way out
            f.write(f"cleaned up {i}")
        raise

@queueable
def wait_for_service(i, seconds):
    time.sleep(seconds)  # blocked in a system call, as a task waiting on a socket is
    return i

@queueable
def stuck_in_c(i):
    return sum(range(10**12))  # one C call that holds the GIL: deaf to everything but a kill

@queueable
def quick(i):
    return i * i
"""


@pytest.fixture(scope="module")
def nb():
    return notebook(NOTEBOOK)


def started_workers(url: str, n: int, *extra: str):
    procs = start_workers(url, n, "--idle-exit", "60", *extra)
    tq = TaskQueue(url)
    wait_for(lambda: len(tq.backend.workers()) == n, timeout=60, what=f"{n} workers to start")
    return procs


def stop(procs) -> None:
    for p in procs:
        p.terminate()
    wait_all(procs)


def cancel_latency(job) -> float:
    """Cancel ``job`` and return the seconds until none of its tasks runs any more."""
    t = time.monotonic()
    job.cancel()
    wait_for(lambda: job.counts().leased == 0, timeout=60, what="the job's running tasks to stop")
    return time.monotonic() - t


@pytest.mark.slow
def test_cancel_stops_running_python_tasks_and_queued_ones_never_start(worker_url, nb, capsys):
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 2)
    try:
        job = tq.insert(functools.partial(nb.simulate, i, 30) for i in range(6))
        other = tq.insert(functools.partial(nb.quick, i) for i in range(20))
        wait_for(lambda: job.counts().leased == 2, timeout=30, what="two tasks to run")
        latency = cancel_latency(job)
        with capsys.disabled():
            print(f"\n[{worker_url.split(':')[0]}] cancel → no task running: {latency:.2f}s (pure Python)")
        assert latency <= 2.0
        job.wait(timeout=10, progress=False)
        counts = job.counts()
        assert (counts.cancelled, counts.completed, counts.dead, counts.failed) == (6, 0, 0, 0)
        errors = job.errors()
        assert [e.type for e in errors] == ["Cancelled"] * 6
        assert job.results(on_error="none") == [None] * 6
        assert all(r.cancelled for r in job.records())
        # The other job on the same queue and workers is untouched.
        assert other.wait(timeout=60, progress=False).results() == [i * i for i in range(20)]
        assert tq.status().cancelled == 6
    finally:
        stop(procs)


@pytest.mark.slow
def test_a_task_stuck_in_c_is_killed_after_the_grace_and_recorded_cancelled(worker_url, nb, capsys):
    """Default grace: the worker cannot raise into a C call, so its lease keeper kills it; the
    task ends cancelled (never WorkerDied) and the worker's other lease goes back uncharged."""
    tq = TaskQueue(worker_url, progress=False)
    (worker,) = started_workers(worker_url, 1)
    try:
        job = tq.insert(functools.partial(nb.stuck_in_c, i) for i in range(2))
        wait_for(lambda: job.counts().leased >= 1, timeout=30, what="a task to run")
        latency = cancel_latency(job)
        with capsys.disabled():
            print(f"\n[{worker_url.split(':')[0]}] cancel → no task running: {latency:.2f}s (stuck in C)")
        assert latency <= defaults.CANCEL_GRACE_SECONDS + 2
        worker.wait(timeout=10)
        assert worker.returncode != 0  # killed
        job.wait(timeout=10, progress=False)
        assert job.counts().cancelled == 2 and job.counts().failed == 0
        assert {e.type for e in job.errors()} == {"Cancelled"}
        # The kill cost no other job anything: a new one runs on a new worker at once.
        other = tq.insert(functools.partial(nb.quick, i) for i in range(3))
        (worker,) = started_workers(worker_url, 1)
        assert other.wait(timeout=60, progress=False).results() == [0, 1, 4]
        assert all(r.attempt == 1 for r in other.records())
    finally:
        stop([worker])


@pytest.mark.slow
def test_a_task_blocked_in_a_system_call_is_told_at_once(worker_url, nb, capsys):
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 1)
    try:
        job = tq.insert(functools.partial(nb.wait_for_service, i, 120) for i in range(3))
        wait_for(lambda: job.counts().leased >= 1, timeout=30, what="a task to run")
        latency = cancel_latency(job)
        with capsys.disabled():
            print(f"\n[{worker_url.split(':')[0]}] cancel → no task running: {latency:.2f}s (in time.sleep)")
        assert latency <= 2.0
        assert job.wait(timeout=10, progress=False).counts().cancelled == 3
        assert all(p.poll() is None for p in procs)  # told, not killed
    finally:
        stop(procs)


@pytest.mark.slow
def test_a_task_may_catch_cancelled_to_clean_up(worker_url, nb, tmp_path):
    use(worker_url)
    procs = started_workers(worker_url, 1)
    try:
        marker = tmp_path / "cleaned"
        handle = nb.simulate_and_clean_up.submit(7, str(marker))
        wait_for(lambda: handle.status == TaskStatus.LEASED, timeout=30, what="the task to run")
        assert handle.cancel() is False  # running: told, not ended at once
        wait_for(lambda: handle.ready(), timeout=10, what="the task to end")
        assert handle.status == TaskStatus.CANCELLED
        assert marker.read_text() == "cleaned up 7"
        with pytest.raises(Exception, match="Cancelled"):
            handle.get()
    finally:
        stop(procs)


def test_cancel_before_any_worker_runs_ends_every_task_at_once(worker_url, nb):
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(functools.partial(nb.quick, i) for i in range(50))
    assert tq.cancel(job.id) == 50
    assert job.done() and job.counts().cancelled == 50
    # A worker started later runs none of them.
    (worker,) = start_workers(worker_url, 1, "--burst")
    assert wait_all([worker], timeout=60) == [0]
    assert job.counts().completed == 0
    with pytest.raises(Exception, match="50 of 50 tasks failed"):
        job.results()
    assert isinstance(Cancelled("x"), BaseException) and not isinstance(Cancelled("x"), Exception)
