"""Scheduling with real worker processes on fq:// and redis://: slow tasks spread over every
worker (slow start), and a batch's unstarted tasks never wait behind a task that outlasts it.

The tasks sleep rather than compute: what is measured is how tasks are handed out, and on a
two-core machine shared with the test itself CPU-bound tasks would measure the machine.
"""

from __future__ import annotations

import functools
import time

import pytest

from nbqueue import TaskQueue
from nbqueue.ids import index_of

from .helpers import notebook, start_workers, wait_all, wait_for

NOTEBOOK = """
import os, time
from nbqueue import queueable

@queueable
def fit_slowly(i, seconds):
    time.sleep(seconds)  # stands in for a model fit of that long
    return os.getpid()
"""


@pytest.fixture(scope="module")
def nb():
    return notebook(NOTEBOOK)


def started_workers(url: str, n: int):
    """``n`` real worker processes, returned once every one has told the queue it is alive."""
    procs = start_workers(url, n, "--idle-exit", "60")
    tq = TaskQueue(url)
    wait_for(lambda: len(tq.backend.workers()) == n, timeout=60, what=f"{n} workers to start")
    return procs


def stop(procs) -> None:
    for p in procs:
        p.terminate()
    wait_all(procs)


@pytest.mark.slow
def test_slow_tasks_run_on_every_worker_at_the_defaults(worker_url, nb):
    """8 tasks of 1 s on 2 workers take about 4 s, not 8 s on one of them while the other idles;
    2 tasks of 10 s run side by side."""
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 2)
    try:
        t = time.monotonic()
        job = tq.insert(functools.partial(nb.fit_slowly, i, 1.0) for i in range(8))
        assert job.wait(timeout=60, progress=False)
        elapsed = time.monotonic() - t
        assert elapsed <= 1.25 * 4.0, f"8 x 1 s on 2 workers took {elapsed:.1f}s"
        pids = job.results()
        assert sorted(pids.count(pid) for pid in set(pids)) == [4, 4]

        t = time.monotonic()
        job = tq.insert(functools.partial(nb.fit_slowly, i, 10.0) for i in range(2))
        assert job.wait(timeout=60, progress=False)
        elapsed = time.monotonic() - t
        assert elapsed <= 12.0, f"2 x 10 s on 2 workers took {elapsed:.1f}s"
        assert len(set(job.results())) == 2
    finally:
        stop(procs)


@pytest.mark.slow
def test_tasks_behind_one_that_outlasts_its_batch_go_to_the_idle_worker(worker_url, nb):
    """Short tasks make batches big; when one task of a batch then runs for 3 s, the tasks
    leased with it go back to the queue and the other worker runs them meanwhile."""
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 2)
    try:
        seconds = [0.02] * 20 + [3.0] + [0.02] * 30
        job = tq.insert(functools.partial(nb.fit_slowly, i, s) for i, s in enumerate(seconds))
        assert job.wait(timeout=60, progress=False)
        finished = {index_of(record.task_id): record.finished for record in job.records()}
        slow = finished.pop(20)
        late = sorted(i for i, at in finished.items() if at > slow)
        assert late == [], f"tasks {late} waited for the slow task to end"
        assert tq.status().failed == 0 and tq.dead() == []
    finally:
        stop(procs)
