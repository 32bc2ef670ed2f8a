"""Steering a job with real worker processes on fq:// and redis://: cancel (waiting tasks never
start, running ones are told, a task deaf to it has its process killed after the grace period).

Latencies are measured from the ``cancel()`` call to the moment no task of the job runs, at the
default settings, and printed (``-s``) for the record.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time

import pytest

from nbqueue import (
    BindError,
    Cancelled,
    TaskFailed,
    TaskHandle,
    TaskQueue,
    TaskTimeout,
    defaults,
    queueable,
    use,
)
from nbqueue.backends.base import TaskStatus

from .helpers import notebook, start_workers, wait_all, wait_for
from .test_cli import cli, cli_json

NOTEBOOK = """
import asyncio, os, time
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

@queueable
def fetch_with(url, timeout):
    return url, timeout  # a function with a timeout argument of its own

@queueable
def quick_but_one(i):
    if i == 1:
        return sum(range(10**12))  # holds the GIL: the worker's own threads cannot run
    return i

@queueable(timeout=1)
def converge(i, seconds):
    # An optimiser that may not converge: given 1 s per try by its decorator.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(100))
    return i

@queueable
async def poll_service(i, seconds):
    await asyncio.sleep(seconds)  # stands in for waiting on an HTTP endpoint
    return i

@queueable
def loop_for(i, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(100))
    return i
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


def cancel_latency(job, capsys, what: str) -> float:
    """Cancel ``job``; the seconds until none of its tasks runs any more, printed for the record
    (``-s``) with the backend and ``what`` the tasks were doing."""
    t = time.monotonic()
    job.cancel()
    wait_for(lambda: job.counts().leased == 0, timeout=60, what="the job's running tasks to stop")
    latency = time.monotonic() - t
    with capsys.disabled():
        print(f"\n[{job.queue.url.split(':')[0]}] cancel → no task running: {latency:.2f}s ({what})")
    return latency


@pytest.mark.slow
def test_cancel_stops_running_python_tasks_and_queued_ones_never_start(worker_url, nb, capsys):
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 2)
    try:
        job = tq.insert(functools.partial(nb.simulate, i, 30) for i in range(6))
        other = tq.insert(functools.partial(nb.quick, i) for i in range(20))
        wait_for(lambda: job.counts().leased == 2, timeout=30, what="two tasks to run")
        latency = cancel_latency(job, capsys, "pure Python")
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
        latency = cancel_latency(job, capsys, "stuck in C")
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
        latency = cancel_latency(job, capsys, "in time.sleep")
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


def test_cancel_from_the_command_line_and_its_reports(worker_url, nb):
    """``nbqueue cancel URL JOB [--task ID]`` and what status, job, jobs and inspect then say."""
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(functools.partial(nb.quick, i) for i in range(10))
    first = cli("cancel", worker_url, job.id, "--task", f"{job.id}-3", "--task", f"{job.id}-4")
    assert first.returncode == 0, first.stderr
    assert "2 waiting task(s) ended now" in first.stdout
    assert cli_json("inspect", worker_url, f"{job.id}-3", code=0)["state"] == "cancelled"
    assert json.loads(cli("cancel", worker_url, job.id, "--json").stdout) == {
        "job_id": job.id,
        "ended": 8,
        "running": 0,
    }
    assert cli_json("status", worker_url)["cancelled"] == 10
    (row,) = cli_json("jobs", worker_url)
    assert row["cancelled"] == 10
    report = cli("job", worker_url, job.id)
    assert report.returncode == 1 and "10/10 done · 0 dead · 10 cancelled" in report.stdout
    missing = cli("cancel", worker_url, "nosuchjob")
    assert missing.returncode == 2 and "no job 'nosuchjob'" in missing.stderr
    foreign = cli("cancel", worker_url, job.id, "--task", "otherjob-1")
    assert foreign.returncode == 2 and "not a task of job" in foreign.stderr


def test_magics_cancel_and_an_interrupted_wait(tmp_path, monkeypatch, capsys):
    """``%queue cancel JOB``; the stop button on ``%%queue --wait`` cancels the cell's job, while
    an interrupted ``job.wait()`` only stops waiting and says how to cancel."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    url = f"fq://{tmp_path / 'cells'}"
    ip = InteractiveShell.instance()
    try:
        ip.run_line_magic("load_ext", "nbqueue")
        ip.run_cell_magic("queue", f"{url} --map i=range(5) --name later", "i + 1")
        job = ip.user_ns["_job"]
        ip.run_line_magic("queue", f"cancel {job.id} --task {job.id}-0")
        assert "1 waiting task(s) ended" in capsys.readouterr().out
        ip.run_line_magic("queue", f"cancel {job.id}")
        assert "4 waiting task(s) ended" in capsys.readouterr().out and job.counts().cancelled == 5

        def interrupt_soon():
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()

        interrupt_soon()
        with pytest.raises(KeyboardInterrupt):  # no worker: it would wait for ever
            ip.run_cell_magic("queue", f"{url} --map i=range(4) --wait", "i * 2")
        waited = ip.user_ns["_job"]
        assert waited.counts().cancelled == 4
        assert "interrupted: cancelled job cell" in capsys.readouterr().err
        kept = TaskQueue(url, progress=False).insert([functools.partial(notebook(NOTEBOOK).quick, 2)])
        interrupt_soon()
        with pytest.raises(KeyboardInterrupt):
            kept.wait(progress=False)
        assert f"To cancel it: tq.cancel({kept.id!r})" in capsys.readouterr().err
        assert kept.counts().queued == 1  # it runs on
    finally:
        InteractiveShell.clear_instance()


@pytest.mark.slow
def test_a_task_past_its_time_limit_fails_its_attempt_and_is_retried_then_dead(worker_url, nb):
    """``@queueable(timeout=1)`` at the default attempts: TaskTimeout inside the task, a failed
    attempt each time, dead after three; the job's quick tasks are untouched."""
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 1)
    try:
        job = tq.insert([functools.partial(nb.converge, 0, 60), functools.partial(nb.converge, 1, 0.1)])
        job.wait(timeout=60, progress=False)
        counts = job.counts()
        assert (counts.completed, counts.dead, counts.failed) == (1, 1, defaults.MAX_ATTEMPTS)
        (error,) = job.errors()
        assert error.type == "TaskTimeout" and "time limit of 1s" in error.message
        assert issubclass(TaskTimeout, BaseException) and not issubclass(TaskTimeout, Exception)
        assert error.attempts == defaults.MAX_ATTEMPTS and "converge" in error.traceback
        assert job.results(on_error="none") == [None, 1]
    finally:
        stop(procs)


@pytest.mark.slow
def test_a_jobs_timeout_overrides_the_functions_and_a_workers_applies_to_the_rest(worker_url, nb):
    tq = TaskQueue(worker_url, progress=False)
    # One attempt each: which limit applies is the point here (retries: the test above).
    procs = started_workers(worker_url, 1, "--task-timeout", "0.5", "--max-attempts", "1")
    try:
        generous = tq.insert([functools.partial(nb.converge, 0, 1.5)], timeout=30)
        limited = tq.insert([functools.partial(nb.loop_for, 0, 60)])
        assert generous.wait(timeout=60, progress=False).results() == [0]
        assert generous.meta["timeout"] == 30
        limited.wait(timeout=60, progress=False)
        (error,) = limited.errors()
        assert error.type == "TaskTimeout" and "time limit of 0.5s" in error.message
        # One task: submit's timeout= is its limit, unless the function takes a timeout itself.
        use(worker_url)
        handle = nb.loop_for.submit(0, 60, timeout=0.3)
        with pytest.raises(TaskFailed, match="time limit of 0.3s"):
            handle.get(timeout=60)
        assert nb.fetch_with.submit("https://example.org", timeout=5).get(timeout=60) == (
            "https://example.org",
            5,
        )
        own = nb.fetch_with.options(timeout=30).submit("u", timeout=5)
        assert own.get(timeout=60) == ("u", 5) and own.job.meta["timeout"] == 30
    finally:
        stop(procs)
    with pytest.raises(ValueError, match="positive number of seconds"):
        tq.insert([functools.partial(nb.quick, 1)], timeout=0)


@pytest.mark.slow
def test_a_long_task_within_a_generous_limit_keeps_its_lease(worker_url, nb):
    """Renewals go on until the limit: a task longer than its lease, inside its limit, runs once."""
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 2, "--lease", "1.5")
    try:
        job = tq.insert([functools.partial(nb.loop_for, 0, 3.5)], timeout=60)  # over two leases
        assert job.wait(timeout=60, progress=False).results() == [0]
        (record,) = job.records()
        assert record.attempt == 1 and job.counts().failed == 0
    finally:
        stop(procs)


@pytest.mark.slow
def test_a_task_stuck_in_c_past_its_limit_is_killed_and_charged_a_timeout(tmp_path, nb):
    """The keeper kills the worker once the grace is over and records a failed attempt of type
    TaskTimeout (retried at the default attempts), never a WorkerDied; ``-p 2`` replaces the
    killed process. (The kill is the cancel's, tested on both backends: fq:// only here.)"""
    worker_url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(worker_url, progress=False)
    (pool,) = start_workers(worker_url, 1, "-p", "2", "--idle-exit", "60")
    try:
        job = tq.insert([functools.partial(nb.stuck_in_c, 0)], timeout=1)
        t = time.monotonic()
        wait_for(lambda: job.counts().failed == 1, timeout=60, what="the first attempt to be charged")
        assert time.monotonic() - t <= 1 + defaults.CANCEL_GRACE_SECONDS + 5
        info = tq.backend.find_task(f"{job.id}-0")
        assert info is not None and info.status.value in ("queued", "leased") and info.attempts >= 1
        quick = tq.insert(functools.partial(nb.quick, i) for i in range(4))
        assert quick.wait(timeout=60, progress=False).results() == [0, 1, 4, 9]  # the pool goes on
        job.cancel()
        job.wait(timeout=30, progress=False)
        assert job.counts().dead == 0
    finally:
        stop([pool])


@pytest.mark.slow
def test_coroutine_tasks_are_cancelled_and_timed_out_through_asyncio(worker_url, nb, capsys):
    tq = TaskQueue(worker_url, progress=False)
    procs = started_workers(worker_url, 1, "--concurrency", "4")
    try:
        job = tq.insert(functools.partial(nb.poll_service, i, 60) for i in range(4))
        wait_for(lambda: job.counts().leased == 4, timeout=30, what="four coroutines to run")
        latency = cancel_latency(job, capsys, "4 coroutines")
        assert latency <= 2.0 and job.wait(timeout=10, progress=False).counts().cancelled == 4
        timed = tq.insert([functools.partial(nb.poll_service, 0, 60)], timeout=0.5)
        timed.wait(timeout=60, progress=False)
        (error,) = timed.errors()
        assert error.type == "TaskTimeout" and error.attempts == defaults.MAX_ATTEMPTS
        assert tq.insert([functools.partial(nb.poll_service, 7, 0.1)]).wait(
            timeout=30, progress=False
        ).results() == [7]
    finally:
        stop(procs)


FIT_NOTEBOOK = """
import numpy as np
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from nbqueue import queueable

X, y = make_classification(n_samples=80, n_features=6, random_state=0)

def model(C):
    return LogisticRegression(C=C, max_iter=200)   # a helper: C <= 0 is refused by sklearn

@queueable
def fit_eval(C, seed):
    return float(cross_val_score(model(C), X, y, cv=3).mean()) + 0 * seed
"""

FIXED_HELPER = """
def model(C):
    return LogisticRegression(C=max(C, 1e-3), max_iter=200)   # the fix

@queueable
def fit_eval_fixed(C, seed):
    return float(cross_val_score(model(C), X, y, cv=3).mean()) + 0 * seed
"""


@pytest.mark.slow
def test_fix_the_bug_and_retry_only_what_failed_with_the_new_code(worker_url):
    """5 of 25 grid tasks fail on a bug in a notebook helper; after the fix, ``job.retry(fn=)``
    re-runs just those five with the new code, in their places, with fresh attempts."""
    nb = notebook(FIT_NOTEBOOK)
    tq = TaskQueue(worker_url, progress=False)
    grid = [(C, seed) for C in (0.0, 0.1, 1.0, 10.0, 100.0) for seed in range(5)]
    job = tq.insert(functools.partial(nb.fit_eval, C, seed) for C, seed in grid)
    procs = started_workers(worker_url, 2)
    try:
        job.wait(timeout=120, progress=False)
        assert job.counts().dead == 5
        assert {e.type for e in job.errors()} == {"ValueError"}  # C=0, refused by scikit-learn
        failed_ids = {e.task_id for e in job.errors()}
        with pytest.raises(BindError):
            job.retry(fn=queueable(lambda C: C))  # does not take seed: refused, nothing queued
        assert job.counts().dead == 5 and job.counts().queued == 0
        exec(FIXED_HELPER, nb.__dict__)  # the user fixes the helper in the notebook
        assert job.retry(fn=nb.fit_eval_fixed) == 5
        # This job object saw the job finish once: its results() must still wait for the reruns.
        results = job.results(timeout=120)
        assert len(results) == 25 and all(0.0 < r <= 1.0 for r in results)
        records = job.records()
        retried = [r for r in records if r.task_id in failed_ids]
        assert len(retried) == 5 and all(r.attempt == 1 for r in retried)
        counts = job.counts()
        assert (counts.completed, counts.dead, counts.cancelled, counts.finished) == (25, 0, 0, 25)
        assert tq.dead() == []
        assert job.retry() == 0  # nothing left to retry
    finally:
        stop(procs)


def test_cancelled_tasks_are_retried_with_the_same_code(worker_url, nb):
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(functools.partial(nb.quick, i) for i in range(6))
    assert job.cancel() == 6
    assert job.retry() == 6  # the cancel is lifted
    (worker,) = start_workers(worker_url, 1, "--burst")
    assert wait_all([worker], timeout=60) == [0]
    assert job.results() == [i * i for i in range(6)]


def test_percent_queue_retry_runs_a_cells_failures_with_the_notebooks_current_helpers(
    tmp_path, monkeypatch, capsys
):
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    url = f"fq://{tmp_path / 'cells'}"
    ip = InteractiveShell.instance()
    try:
        ip.run_cell("def inverse(x):\n    return 1 / x   # the bug: x may be 0\n").raise_error()
        ip.run_line_magic("load_ext", "nbqueue")
        ip.run_cell_magic("queue", f"{url} --map x=range(-2, 3)", "inverse(x) * 2")
        job = ip.user_ns["_job"]
        TaskQueue(url).poll(burst=True, max_attempts=1)
        assert job.counts().dead == 1
        ip.run_cell("def inverse(x):\n    return 1 / x if x else 0.0   # fixed\n").raise_error()
        ip.run_line_magic("queue", f"retry {job.id}")
        assert "queued 1 failed task(s)" in capsys.readouterr().out
        TaskQueue(url).poll(burst=True)
        assert job.results() == [-1.0, -2.0, 0.0, 2.0, 1.0]
        made_elsewhere = TaskQueue(url, progress=False).insert(
            [functools.partial(notebook(NOTEBOOK).quick, 1)]
        )
        with pytest.raises(Exception, match="not made by %%queue"):
            ip.run_line_magic("queue", f"retry {made_elsewhere.id}")
    finally:
        InteractiveShell.clear_instance()


@pytest.mark.slow
def test_the_kill_gives_the_workers_other_leases_back_uncharged(tmp_path, nb):
    """The killed worker held batch-mates it had not started (its give-back thread could not run
    while the task held the GIL): they go back released, not expired, and run once more at
    attempt 1, never as suspects charged for the kill, on the worker the notebook's pool starts
    in place of the killed one. (The keeper's release and fail are contract-tested on every
    backend: this runs on fq:// only.)"""
    tq = TaskQueue(f"fq://{tmp_path / 'queue'}", progress=False)
    job = tq.insert(functools.partial(nb.quick_but_one, i) for i in range(12))
    pool = tq.spawn_workers(1)
    try:
        (first,) = pool.pids
        stuck = TaskHandle(tq, f"{job.id}-1")
        wait_for(lambda: stuck.status == TaskStatus.LEASED, timeout=60, what="the stuck task to run")
        wait_for(lambda: job.counts().leased > 1, timeout=10, what="its batch-mates to be held")
        held = job.counts().leased - 1
        assert stuck.cancel() is False  # running: told, then killed after the grace
        job.wait(timeout=60, progress=False)
        counts = job.counts()
        assert (counts.completed, counts.cancelled, counts.dead) == (11, 1, 0)
        assert held >= 1 and all(r.attempt == 1 for r in job.records() if r.ok)
        assert stuck.status == TaskStatus.CANCELLED
        assert pool.pids != [first] and pool.alive() == 1  # replaced, and it ran the rest
    finally:
        pool.stop()
