"""Watching a job through the public API, with real worker processes on fq:// and redis://:
waits woken by the commit (one task's round trip in milliseconds), results as they finish,
what is done now, and the job as a table."""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import time

import pytest

import nbqueue
from nbqueue import PENDING, TaskQueue
from nbqueue.backends.dirwatch import file_system_type, notifications_work

from .helpers import notebook, wait_for

NB = """
import time
import numpy as np
from nbqueue import queueable, Terminal
from sklearn.linear_model import Ridge
from sklearn.model_selection import cross_val_score

X = np.random.default_rng(0).normal(size=(60, 4))
Y = X @ np.array([1.0, -2.0, 0.5, 0.0])

@queueable
def inc(x):
    return x + 1

@queueable
def fit(alpha, folds=3, weights=None):
    if alpha < 0:
        raise Terminal(f"alpha must be positive, not {alpha}")
    scores = cross_val_score(Ridge(alpha=alpha), X, Y, cv=folds)
    return {"r2": float(scores.mean()), "folds": folds}

@queueable
def slow(i, seconds):
    time.sleep(seconds)
    return i * i

@queueable
def folds(n, pause):
    # A slow task that says how far it got, as often as a tight loop would.
    from nbqueue import current_task
    me = current_task()
    for k in range(n):
        for step in range(20_000):  # reported far more often than anyone reads it
            me.progress(k + step / 20_000, n, f"fold {k + 1} of {n}")
        time.sleep(pause)
    return n
"""


@pytest.fixture(scope="module", params=["fq", "redis"])
def served(request, tmp_path_factory, redis_server):
    """A queue with two idle worker processes, as a notebook user starts them (defaults)."""
    if request.param == "fq":
        url = f"fq://{tmp_path_factory.mktemp('watch') / 'queue'}"
    else:
        url = redis_server.url(f"watch-{request.param}")
    tq = TaskQueue(url)
    workers = tq.spawn_workers(2)
    nb = notebook(NB)
    nbqueue.use(tq)
    nb.inc.submit(0).get(timeout=120)  # the workers are up
    yield tq, nb
    workers.stop()
    tq.close()


def test_one_task_round_trip_is_woken_by_the_commit(served):
    """fn.submit(x).get() and insert().wait() are woken by the commit, not a timer: before,
    both polled every 20 ms (23 ms median on redis://, 54 ms on fq://)."""
    tq, nb = served
    gets, waits = [], []
    for i in range(15):
        time.sleep(0.05)  # an idle worker, as between a user's cells
        t = time.perf_counter()
        assert nb.inc.submit(i).get(timeout=10) == i + 1
        gets.append(time.perf_counter() - t)
        t = time.perf_counter()
        job = tq.insert([functools.partial(nb.inc, i)], progress=False)
        assert job.wait(timeout=10, progress=False).results() == [i + 1]
        waits.append(time.perf_counter() - t)
    assert statistics.median(gets) < 0.012, gets
    assert statistics.median(waits) < 0.012, waits


def test_as_completed_yields_each_task_as_it_commits_until_the_job_ends(served):
    tq, nb = served
    other = tq.insert([functools.partial(nb.slow, i, 0.01) for i in range(5)], progress=False)
    job = tq.insert([functools.partial(nb.slow, i, 0.05 * (i % 3)) for i in range(24)], progress=False)
    seen, first_at = [], None
    for record in job.as_completed(timeout=60):
        if first_at is None:
            first_at = job.counts().finished
        assert record.ok and record.value == record.index**2 and record.task_id == f"{job.id}-{record.index}"
        seen.append(record.index)
    assert sorted(seen) == list(range(24))  # every task once, and only this job's
    assert first_at is not None and first_at < 24  # the first came while the job still ran
    assert job.done() and other.wait(timeout=30, progress=False).results() == [i * i for i in range(5)]


def test_results_without_waiting_show_what_is_done_now(served):
    tq, nb = served
    job = tq.insert([functools.partial(nb.slow, i, 0.3 if i == 3 else 0.0) for i in range(4)], progress=False)
    deadline = time.monotonic() + 30
    while job.counts().completed < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    now = job.results(wait=False)
    assert now[:3] == [0, 1, 4] and now[3] in (PENDING, 9)
    assert job.results(timeout=30) == [0, 1, 4, 9]  # and by default it waits


def test_to_dataframe_has_arguments_values_and_errors_row_by_row(served):
    """The grid a data scientist rebuilt by hand from a parameter list and results(): the failed
    and cancelled rows keep their own arguments."""
    pytest.importorskip("pandas")
    tq, nb = served
    alphas = [0.1, -1.0, 1.0, 10.0]
    tasks = [functools.partial(nb.fit, a, folds=3, weights=list(range(5))) for a in alphas]
    tasks.append(functools.partial(nb.fit, 5.0, folds=4))
    job = tq.insert(tasks, progress=False)
    late = tq.insert([functools.partial(nb.fit, 2.0, folds=5)], progress=False, delay=60)
    late.cancel()
    df = job.to_dataframe(timeout=60)
    assert list(df.index) == [0, 1, 2, 3, 4] and df.index.name == "task"
    assert list(df["alpha"]) == alphas + [5.0] and list(df["folds"]) == [3, 3, 3, 3, 4]
    assert "weights" not in df.columns  # not plain data: left in the pickled arguments
    assert list(df["status"]) == ["completed", "failed", "completed", "completed", "completed"]
    failed = df.loc[1]
    assert failed["error"] == "Terminal" and "alpha must be positive" in failed["error_message"]
    assert failed["alpha"] == -1.0 and failed["attempts"] == 1
    assert df.loc[0, "r2"] > 0.9 and df.loc[4, "folds"] == 4  # the dict value spread into columns
    assert (df["duration"].dropna() >= 0).all() and str(df["started"].dtype).startswith("datetime64")
    assert df.loc[0, "worker"].split(":")[0]
    cancelled = late.to_dataframe(timeout=30)
    assert list(cancelled["status"]) == ["cancelled"] and cancelled.loc[0, "alpha"] == 2.0
    assert cancelled.loc[0, "error"] == "Cancelled"


def test_to_dataframe_without_waiting_lists_unfinished_tasks_as_pending(served):
    pytest.importorskip("pandas")
    tq, nb = served
    job = tq.insert([functools.partial(nb.slow, i, 0.0) for i in range(3)], progress=False, delay=60)
    df = job.to_dataframe(wait=False)
    assert list(df["status"]) == ["pending"] * 3 and list(df.index) == [0, 1, 2]
    job.cancel()
    assert list(job.to_dataframe(timeout=30)["i"]) == [0, 1, 2]  # cancelled: from the kept tasks


def test_the_view_counts_the_workers_that_ran_the_job_and_shows_what_runs_now(served):
    """Two workers (one slot each) with tasks leased ahead: "running" is what executes now, never
    more than the slots, the rest prefetched; the workers that ran the job are counted while it
    runs and after it ended. Beside it, a second job the workers never touch counts none."""
    tq, nb = served
    job = tq.insert((functools.partial(nb.slow, i, 0.05) for i in range(160)), progress=False)
    idle = tq.insert([], progress=False)
    seen = []

    def prefetched_while_running() -> bool:
        snap = job.snapshot()
        seen.append(snap)
        return snap.counts.leased > 2 and bool(snap.running_now) and snap.workers == 2

    wait_for(prefetched_while_running, timeout=60, what="leases held ahead while tasks run")
    assert all(s.running_now is None or s.running_now <= 2 for s in seen)
    text = seen[-1].text(job.name)
    assert " prefetched · " in text and "ran by 2 worker(s)" in text, text
    job.wait(timeout=120, progress=False)
    after = job.snapshot()
    assert after.workers == 2 and after.running_now == 0 and " 0 running · 0 queued" in after.text(job.name)
    assert job.workers_ran() == set(tq.backend.workers())  # the same two processes
    assert idle.snapshot().workers == 0


def test_fq_falls_back_to_polling_where_notifications_are_not_trusted(tmp_path, monkeypatch):
    """A shared file system never tells one machine of another's writes: there (and with
    $NBQUEUE_FQ_POLL) waits and idle workers poll, briefly, and still see everything."""
    assert file_system_type(str(tmp_path)) is not None
    assert notifications_work(str(tmp_path))  # the test machine's disk is local
    monkeypatch.setenv("NBQUEUE_FQ_POLL", "1")
    assert not notifications_work(str(tmp_path))
    tq = TaskQueue(f"fq://{tmp_path / 'shared'}")
    workers = tq.spawn_workers(1)  # inherits the setting, as every process on such a mount would
    try:
        nb = notebook(NB)
        job = tq.insert([functools.partial(nb.inc, i) for i in range(20)], progress=False)
        assert job.wait(timeout=60, progress=False).results() == list(range(1, 21))
        rounds = []
        for i in range(5):
            time.sleep(0.2)
            t = time.perf_counter()
            job = tq.insert([functools.partial(nb.inc, i)], progress=False)
            assert job.wait(timeout=10, progress=False).results() == [i + 1]
            rounds.append(time.perf_counter() - t)
        assert statistics.median(rounds) < 0.5, rounds  # the poll backs off to 50 ms, no further
    finally:
        workers.stop()
        tq.close()


def test_a_running_task_reports_its_own_progress_coalesced_into_heartbeats(served):
    tq, nb = served
    tasks = [functools.partial(nb.folds, 8, 0.25), functools.partial(nb.slow, 1, 0.0)]
    job = tq.insert(tasks, progress=False)
    deadline = time.monotonic() + 30
    running = []
    while time.monotonic() < deadline and not (running and running[0].done >= 2):
        running = job.running_progress()
        time.sleep(0.05)
    (progress,) = running
    assert progress.task_id == f"{job.id}-0" and progress.total == 8 and 0 < progress.fraction < 1
    assert progress.note.startswith("fold ") and progress.note.endswith(" of 8")
    snap = job.snapshot()  # what the widget and the text view draw
    assert snap.running and "task 0: " in snap.text(job.name) and "fold " in snap.text(job.name)
    widget = job.view.widget  # the widget draws the same, as small bars with their notes
    job.view.refresh(force=True)
    (part,) = [c for c in widget.children if "fold " in getattr(c, "value", "")]
    assert "width:" in part.value
    widget.close()
    shown = subprocess.run(
        [sys.executable, "-m", "nbqueue", "job", tq.worker_url, job.id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "reporting progress" in shown.stdout and "fold " in shown.stdout, shown.stdout + shown.stderr
    assert job.wait(timeout=60, progress=False).results() == [8, 1]
    # Gone once the task ended: the next heartbeat (within about a second) no longer carries it.
    deadline = time.monotonic() + 5
    while job.running_progress() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.running_progress() == []
    # 20,000 reports per fold cost the task little: no storage write per call.
    record = job.records()[0]
    assert record.finished - record.started < 8 * 0.25 + 3.0


def test_directory_watches_wake_on_a_new_name_and_reuse_their_descriptors(tmp_path):
    """Closing an inotify descriptor costs the kernel milliseconds: watches are pooled."""
    import os

    from nbqueue.backends.dirwatch import DirectoryWatch

    open_before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        watch = DirectoryWatch(str(tmp_path), notify=True)
        assert watch.notified
        assert watch.wait(0.001) is False  # nothing new: a quiet wait times out
        (tmp_path / f"name-{i}").write_bytes(b"")  # a new name, as an fq:// commit links one
        t = time.perf_counter()
        assert watch.wait(5) is True and time.perf_counter() - t < 0.5
        watch.close()
    assert len(os.listdir("/proc/self/fd")) <= open_before + 1
