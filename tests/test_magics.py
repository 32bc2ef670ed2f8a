"""%%queue and %queue through a real IPython shell, with real worker processes."""

from __future__ import annotations

import sys

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbqueue import PENDING, TaskQueue
from nbqueue import queue as nbqueue_queue
from nbqueue.magics import _workers_alive, split_args
from nbqueue.procs import WorkerProcesses

from .helpers import notebook

NOTEBOOK_CELLS = """
import math
import numpy as np

SCALE = 3.0                        # a notebook global the cell reads
WEIGHTS = np.arange(4.0)           # and an array

def shrink(x, alpha):              # a notebook function the cell calls
    return x / (1.0 + alpha)
"""


@pytest.fixture
def shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nbqueue_queue, "_last_used", None)  # a fresh kernel has used no queue
    ip = InteractiveShell.instance()
    ip.run_cell(NOTEBOOK_CELLS)
    ip.run_line_magic("load_ext", "nbqueue")
    ip.run_line_magic("reload_ext", "nbqueue")  # loading twice is harmless
    yield ip
    ip.run_line_magic("queue", "workers stop")
    InteractiveShell.clear_instance()


def test_split_args_keeps_expressions_whole():
    line = "fq://./q --map alpha=[0.1, 1, 10] --map seed=range(5) --name 'my sweep' --wait"
    assert split_args(line) == [
        "fq://./q",
        "--map",
        "alpha=[0.1, 1, 10]",
        "--map",
        "seed=range(5)",
        "--name",
        "my sweep",
        "--wait",
    ]


def test_cell_fans_out_and_runs_on_worker_processes(shell, tmp_path):
    url = f"fq://{tmp_path / 'grid'}"
    cell = """
scaled = shrink(SCALE * float(WEIGHTS.sum()), alpha)
scaled + seed
"""
    shell.run_cell_magic(
        "queue", f"{url} --map alpha=[0, 1, 2] --map seed=range(2) --workers 2 --wait --out grid", cell
    )
    grid = shell.user_ns["grid"]
    expected = [18.0 / (1 + a) + s for a in (0, 1, 2) for s in (0, 1)]
    assert grid == pytest.approx(expected)
    job = shell.user_ns["_job"]
    assert job.meta["source"] == cell and job.total == 6
    assert all(r.worker and not r.worker.endswith(f":{__import__('os').getpid()}") for r in job.records())
    table = job.to_dataframe()  # the --map names are the columns, beside each value
    assert list(zip(table["alpha"], table["seed"], table["value"], strict=True)) == [
        (a, s, pytest.approx(18.0 / (1 + a) + s)) for a in (0, 1, 2) for s in (0, 1)
    ]


def test_zip_pairs_values_and_last_statement_gives_none(shell, tmp_path):
    url = f"fq://{tmp_path / 'zip'}"
    shell.run_cell_magic("queue", f"{url} --map a=[1, 2, 3] --map b=[10, 20, 30] --zip --name pairs", "a * b")
    job = shell.user_ns["_job"]
    assert job.total == 3 and job.name == "pairs"
    TaskQueue(url).poll(burst=True)
    assert job.results() == [10, 40, 90]
    shell.run_cell_magic("queue", f"{url} --map a=[1] --out j2", "x = a + 1")
    TaskQueue(url).poll(burst=True)
    assert shell.user_ns["j2"].results() == [None]


def test_a_cell_with_a_priority_goes_before_a_big_job(shell, tmp_path):
    url = f"fq://{tmp_path / 'prio'}"
    shell.run_cell_magic("queue", f"{url} --map a=range(50) --name big", "a")
    shell.run_cell_magic("queue", f"{url} --map a=[1, 2] --priority 3 --out urgent", "a * 100")
    urgent = shell.user_ns["urgent"]
    assert urgent.meta["priority"] == 3
    tq = TaskQueue(url)
    assert tq.poll(max_tasks=2).completed == 2
    assert urgent.results() == [100, 200]  # both ran before any of the big job's 50 tasks
    assert tq.status().completed == 2


def test_errors_are_reported_at_the_magic_with_the_line_and_nothing_is_queued(shell, tmp_path):
    url = f"fq://{tmp_path / 'bad'}"
    with pytest.raises(UsageError, match=r"line 2: .*(invalid syntax|never closed|unexpected EOF)"):
        shell.run_cell_magic("queue", f"{url} --map a=[1]", "x = a\ny = (\n")
    with pytest.raises(UsageError, match=r"line 2: name 'undefined_thing' is not defined"):
        shell.run_cell_magic("queue", f"{url} --map a=[1]", "x = a\nundefined_thing + x\n")
    with pytest.raises(UsageError, match="--map b=nope"):
        shell.run_cell_magic("queue", f"{url} --map b=nope", "b")
    with pytest.raises(UsageError, match="--zip needs equally long"):
        shell.run_cell_magic("queue", f"{url} --map a=[1, 2] --map b=[1] --zip", "a + b")
    tq = TaskQueue(url)
    assert tq.jobs() == [] and tq.status().inserted == 0


def test_line_magics(shell, tmp_path, capsys):
    url = f"fq://{tmp_path / 'lines'}"
    shell.run_cell_magic("queue", f"{url} --map i=range(3) --name trio", "1 / (i - 1)")
    job = shell.user_ns["_job"]
    capsys.readouterr()
    shell.run_line_magic("queue", f"results {job.id} --out early")  # never blocks the kernel
    assert shell.user_ns["early"] == [PENDING] * 3 and "3 not finished yet" in capsys.readouterr().out
    TaskQueue(url).poll(max_attempts=1, burst=True)
    capsys.readouterr()
    shell.run_line_magic("queue", f"status {url}")
    out = capsys.readouterr().out
    assert "completed" in out and "dead" in out
    shell.run_line_magic("queue", "jobs")
    listing = capsys.readouterr().out
    assert "job trio" in listing and "3/3 done · 1 dead" in listing
    shell.run_line_magic("queue", f"results {job.id} --out res")
    values = shell.user_ns["res"]
    assert values[0] == -1.0 and values[2] == 1.0 and values[1].type == "ZeroDivisionError"
    shell.run_line_magic("queue", "dlq list")
    assert f"{job.id}-1" in capsys.readouterr().out
    shell.run_line_magic("queue", "dlq purge")
    assert TaskQueue(url).dead() == []
    with pytest.raises(UsageError, match="unknown %queue command"):
        shell.run_line_magic("queue", "frobnicate")


def test_workers_start_and_stop_from_the_kernel(shell, tmp_path, capsys):
    url = f"fq://{tmp_path / 'w'}"
    shell.run_line_magic("queue", f"workers start 1 {url}")
    assert "started 1 worker(s)" in capsys.readouterr().out
    shell.run_cell_magic("queue", f"{url} --map i=range(4) --wait --timeout 60", "i * i")
    assert shell.user_ns["_results"] == [0, 1, 4, 9]
    shell.run_line_magic("queue", "workers")
    assert "running" in capsys.readouterr().out
    shell.run_line_magic("queue", "workers stop")
    assert "stopped 1 worker(s)" in capsys.readouterr().out


def test_workers_start_without_a_url_serves_the_queue_the_notebook_inserted_into(shell, tmp_path, capsys):
    """The job sits on the queue the notebook's own code used (not a magic): workers started
    without a URL go there, not to ./queues/default; the listing shows live workers only."""
    url = f"fq://{tmp_path / 'mine'}"
    shell.run_cell(
        "from functools import partial\n"
        "from nbqueue import TaskQueue, queueable\n"
        "half = queueable(lambda x: x / 2)\n"
        f"tq = TaskQueue({url!r}, progress=False)\n"
        "job = tq.insert(partial(half, x) for x in range(3))\n"
    ).raise_error()
    shell.run_line_magic("queue", "workers start 1")
    assert f"on {url}" in capsys.readouterr().out
    assert shell.user_ns["job"].wait(timeout=60, progress=False).results() == [0.0, 0.5, 1.0]
    shell.run_line_magic("queue", "workers start 1")  # a second, on the same queue
    capsys.readouterr()
    shell.run_line_magic("queue", "workers")
    assert capsys.readouterr().out.count("running") == 2
    for pool in shell.magics_manager.registry["QueueMagics"]._workers[:1]:
        pool.stop()  # one exits (as an idle worker would)
    shell.run_line_magic("queue", "workers")
    assert capsys.readouterr().out.count("running") == 1
    shell.run_line_magic("queue", "workers stop")
    assert "stopped 1 worker(s)" in capsys.readouterr().out
    assert not (tmp_path / "queues").exists()


def test_wait_stops_with_a_clear_error_when_its_workers_die(tmp_path):
    nb = notebook("from nbqueue import queueable\n@queueable\ndef one():\n    return 1\n")
    job = TaskQueue(f"fq://{tmp_path / 'q'}").insert([nb.one], progress=False)
    pool = WorkerProcesses([sys.executable, "-c", "raise SystemExit(3)"], 2)
    pool.wait(timeout=30)
    with pytest.raises(RuntimeError, match=r"exited \(codes 3, 3\) before it finished"):
        job.wait(timeout=30, progress=False, check=lambda: _workers_alive(pool, job))


SKLEARN_CELLS = """
from sklearn.datasets import make_classification
from sklearn.model_selection import cross_val_score
from sklearn.svm import SVC

X, y = make_classification(n_samples=60, n_features=5, random_state=0)

def fit_eval(C, gamma):
    return float(cross_val_score(SVC(C=C, gamma=gamma), X, y, cv=3).mean())
"""


def test_a_grid_over_a_from_imported_sklearn_helper_runs_in_about_the_time_the_work_takes(shell, tmp_path):
    """The walk that failed: a notebook helper calling from-imported cross_val_score, fanned out
    by %%queue (dill's recurse=True spent 5 s and raised RecursionError before queuing)."""
    import time

    shell.run_cell(SKLEARN_CELLS)
    url = f"fq://{tmp_path / 'svc'}"
    started = time.perf_counter()
    shell.run_cell_magic(
        "queue",
        f"{url} --map C=[0.1, 1.0] --map gamma=[0.1, 1.0] --workers 2 --wait --out grid",
        "fit_eval(C, gamma)",
    )
    elapsed = time.perf_counter() - started
    grid = shell.user_ns["grid"]
    assert len(grid) == 4 and all(0.0 < score <= 1.0 for score in grid), grid
    # The work is milliseconds; what remains is starting two workers that import scikit-learn.
    assert elapsed < 30, elapsed


def test_a_failing_cell_traceback_shows_the_cell_line_from_the_worker(shell, tmp_path):
    url = f"fq://{tmp_path / 'tb'}"
    cell = "ratio = 1.0\nratio / (C - C)  # divides by zero on purpose\n"
    shell.run_cell_magic("queue", f"{url} --map C=[1] --workers 1 --retries 0 --wait --out res", cell)
    (error,) = shell.user_ns["_job"].errors()
    assert error.type == "ZeroDivisionError"
    assert "ratio / (C - C)  # divides by zero on purpose" in error.traceback, error.traceback
    # It starts at the cell: the worker's own frames are only in the full traceback.
    assert "nbqueue" not in error.traceback and "nbqueue/worker.py" in error.full_traceback


def test_a_cell_job_is_named_by_the_prompt_number_of_its_cell(shell, tmp_path):
    url = f"fq://{tmp_path / 'named'}"
    prompt = shell.execution_count  # the number the next cell's prompt shows: [n]
    shell.run_cell(f"%%queue {url} --map a=[1, 2]\nprint('a is', a)\na", store_history=True)
    job = shell.user_ns["_job"]
    assert job.name == f"cell {prompt}"
