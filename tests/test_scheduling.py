"""Scheduling with real worker processes on fq:// and redis://: slow tasks spread over every
worker (slow start), and a batch's unstarted tasks never wait behind a task that outlasts it.

The tasks sleep rather than compute: what is measured is how tasks are handed out, and on a
two-core machine shared with the test itself CPU-bound tasks would measure the machine.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import subprocess
import sys
import time

import pytest

from nbqueue import TaskHandle, TaskQueue
from nbqueue.ids import index_of, task_id

from .helpers import notebook, start_workers, wait_all, wait_for

NOTEBOOK = """
import asyncio, os, time
from nbqueue import queueable, current_task

@queueable
def fit_slowly(i, seconds):
    time.sleep(seconds)  # stands in for a model fit of that long
    return os.getpid()

@queueable
async def fetch(i, seconds):
    await asyncio.sleep(seconds)  # stands in for an HTTP request or a database query
    if i < 0:
        raise LookupError(f"no page {i}")
    return i, current_task().task_id  # each task sees its own context while others run

@queueable
def runs_its_own_loop(i):
    return asyncio.run(fetch(i, 0.01))[0]
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


def run_job(tq: TaskQueue, tasks, **options) -> tuple:
    """Insert ``tasks`` as a job and wait for it to finish: the job and the seconds it took,
    insert included (what a user waits)."""
    t = time.monotonic()
    job = tq.insert(tasks, **options)
    assert job.wait(timeout=60, progress=False)
    return job, time.monotonic() - t


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
        job, elapsed = run_job(tq, (functools.partial(nb.fit_slowly, i, 1.0) for i in range(8)))
        assert elapsed <= 1.25 * 4.0, f"8 x 1 s on 2 workers took {elapsed:.1f}s"
        pids = job.results()
        assert sorted(pids.count(pid) for pid in set(pids)) == [4, 4]

        job, elapsed = run_job(tq, (functools.partial(nb.fit_slowly, i, 10.0) for i in range(2)))
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


@pytest.mark.slow
def test_async_def_tasks_overlap_on_one_worker_with_concurrency(worker_url, nb):
    """200 tasks awaiting 0.2 s each on one worker process at --concurrency 50: about 1 s
    instead of 40 s, and each task sees its own current_task() while the others run."""
    tq = TaskQueue(worker_url, progress=False)
    procs = start_workers(worker_url, 1, "--idle-exit", "60", "--concurrency", "50")
    try:
        wait_for(lambda: len(tq.backend.workers()) == 1, timeout=60, what="the worker to start")
        job, elapsed = run_job(tq, (functools.partial(nb.fetch, i, 0.2) for i in range(200)))
        assert elapsed < 6.0, f"200 x 0.2 s at concurrency 50 took {elapsed:.1f}s"
        results = job.results()
        assert [i for i, _ in results] == list(range(200))
        assert all(task_id == f"{job.id}-{i}" for i, task_id in results)
        # Sync tasks on the same worker run one by one, outside the loop: asyncio.run works there.
        mixed = tq.insert([functools.partial(nb.runs_its_own_loop, 7), functools.partial(nb.fetch, 8, 0.0)])
        assert mixed.wait(timeout=60, progress=False).results() == [7, (8, f"{mixed.id}-1")]
    finally:
        stop(procs)


def test_async_def_tasks_run_and_fail_like_any_task_at_the_defaults(worker_url, nb):
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(functools.partial(nb.fetch, i, 0.01) for i in (1, 2, -3))
    (worker,) = start_workers(worker_url, 1, "--burst")
    assert wait_all([worker]) == [0]
    assert job.results(on_error="none") == [(1, f"{job.id}-0"), (2, f"{job.id}-1"), None]
    (error,) = job.errors()
    assert error.type == "LookupError" and "no page -3" in error.message
    assert error.attempts == 3 and tq.status().failed == 3  # retried, as any failing task is


def test_wait_async_and_get_async_leave_the_event_loop_running(worker_url, nb):
    tq = TaskQueue(worker_url, progress=False)
    (worker,) = start_workers(worker_url, 1, "--idle-exit", "30")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        beat = asyncio.ensure_future(ticker())
        job = tq.insert(functools.partial(nb.fit_slowly, i, 0.5) for i in range(2))
        await job.wait_async(timeout=60)
        one = tq.insert(functools.partial(nb.fit_slowly, 1, 0.5))
        pid = await TaskHandle(tq, task_id(one.id, 0)).get_async(timeout=60)
        beat.cancel()
        return job, pid, ticks

    try:
        job, pid, ticks = asyncio.run(main())
        assert len(job.results()) == 2 and pid == job.results()[0]
        assert ticks >= 10  # the loop ran other work for the whole second and more of waiting
    finally:
        worker.terminate()
        wait_all([worker])


@pytest.mark.slow
def test_a_small_job_behind_a_big_one_runs_at_once_and_a_priority_goes_first(worker_url, nb):
    """Jobs take turns: 4 quick tasks inserted behind 400 tasks of 0.1 s (20 s of work for two
    workers) finish in about a second, not after the big job; a job with a priority runs before
    the big job's next tasks."""
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 2)
    try:
        _, took_alone = run_job(tq, (functools.partial(nb.fit_slowly, i, 0.1) for i in range(4)))
        big = tq.insert(functools.partial(nb.fit_slowly, i, 0.1) for i in range(400))
        wait_for(lambda: big.counts().completed >= 10, timeout=30, what="the big job to get going")
        _, took = run_job(tq, (functools.partial(nb.fit_slowly, i, 0.1) for i in range(4)))
        assert took < 2.0, f"4 tasks behind a big job took {took:.1f}s (alone: {took_alone:.1f}s)"
        inserted = time.time()
        urgent = tq.insert((functools.partial(nb.fit_slowly, i, 0.1) for i in range(10)), priority=5)
        assert urgent.wait(timeout=30, progress=False)
        # Once the workers' batches in hand were done (~0.5 s), no big-job task started while an
        # urgent one still waited to start. (One that starts while the other worker runs the last
        # urgent tasks, leased already, overtakes nothing.)
        last_urgent_start = max(r.started for r in urgent.records())
        overtaken = [r for r in big.records() if inserted + 1.0 < r.started < last_urgent_start]
        assert overtaken == [], f"{len(overtaken)} big-job tasks started while the urgent job waited"
        assert big.counts().completed < 300  # the big job was still far from done
    finally:
        stop(procs)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_of_several_queues_drains_them_in_the_order_given(worker_url, nb, processes):
    """`nbqueue worker HIGH LOW`: every task of HIGH runs before any of LOW (RQ's priorities),
    with one process and with -p 2 (the URLs travel in the children's environment)."""
    high_url = worker_url + "-high"  # another queue: a sibling directory, or another Redis queue
    low, high = TaskQueue(worker_url, progress=False), TaskQueue(high_url, progress=False)
    low_job = low.insert(functools.partial(nb.fit_slowly, i, 0.05) for i in range(10))
    # Slow enough that each is leased on its own (slow start), so none sits in a batch.
    high_job = high.insert(functools.partial(nb.fit_slowly, i, 0.6) for i in range(4))
    cmd = ["--burst", "-p", str(processes)]
    (worker,) = start_workers(high_url, 1, worker_url, *cmd)
    assert wait_all([worker], timeout=60) == [0]
    assert (len(low_job.results()), len(high_job.results())) == (10, 4)
    first_low = min(r.started for r in low_job.records())
    # No task of HIGH still waited when one of LOW started (with two processes, one may start
    # LOW while the other runs the last task of HIGH). A HIGH task that had waited for a slot
    # would start a whole task (0.6 s) late; one leased just before LOW's start, a moment late.
    assert max(r.started for r in high_job.records()) <= first_low + 0.25
    if processes == 1:
        assert max(r.finished for r in high_job.records()) <= first_low


@pytest.mark.slow
def test_delayed_tasks_show_as_scheduled_until_due_then_run(worker_url, nb, monkeypatch):
    """insert(delay=), insert(eta=) and fn.submit_later: scheduled (not queued) in counts, the
    progress line, `nbqueue status`/`job` and the report the REST API serves, until due."""
    from nbqueue import handles
    from nbqueue.progress import describe
    from nbqueue.report import job_report

    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 1)
    try:
        inserted = time.time()
        later = tq.insert((functools.partial(nb.fit_slowly, i, 0.0) for i in range(3)), delay=2.0)
        at = datetime.datetime.now() + datetime.timedelta(seconds=2)
        timed = tq.insert([functools.partial(nb.fit_slowly, 9, 0.0)], eta=at)
        monkeypatch.setattr(handles, "_default", tq)  # nbqueue.use(tq), undone after the test
        handle = nb.fit_slowly.submit_later(2.0, 10, 0.0)
        time.sleep(0.5)
        counts = later.counts()
        assert (counts.scheduled, counts.queued, counts.completed) == (3, 0, 0)
        assert tq.status().scheduled == 5
        assert describe(counts, later.total).endswith("0 queued · 3 scheduled")
        assert job_report(tq, later.id)["scheduled"] == 3
        cli = subprocess.run(
            [sys.executable, "-m", "nbqueue", "status", worker_url, "--json"], capture_output=True, text=True
        )
        assert json.loads(cli.stdout)["scheduled"] == 5, cli.stderr
        for job in (later, timed, handle.job):
            assert job.wait(timeout=30, progress=False)
            assert min(r.started for r in job.records()) >= inserted + 1.9
        assert handle.get(timeout=5) == handle.get(timeout=5) and tq.status().scheduled == 0
    finally:
        stop(procs)
    with pytest.raises(ValueError, match="give one of delay and eta"):
        tq.insert([functools.partial(nb.fit_slowly, 1, 0.0)], delay=1, eta=at)
