"""What a task prints goes with its task: kept on its record (bounded), read back by job and
index, on a failed task's error, by ``nbqueue job --output``; echoed by ``--echo-output`` only.
Tracebacks start at the task's own code, the whole one kept beside."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

from nbqueue import TaskQueue, defaults

from .helpers import notebook, start_workers, wait_all

CHATTY = """
import asyncio, sys
import numpy as np
from scipy import stats
from nbqueue import queueable

@queueable
def fit(seed):
    rng = np.random.default_rng(seed)
    sample = rng.normal(size=200)
    print(f"seed {seed}: mean {sample.mean():.3f}")
    print(f"seed {seed}: warning, small sample", file=sys.stderr)
    if seed == 2:
        raise ValueError(f"seed {seed} diverged")
    return float(stats.skew(sample))

@queueable
def flood(n):
    for i in range(n):
        print(f"line {i:07d}")
    return n

@queueable
async def threaded(n):
    # asyncio.to_thread copies the task's context into each thread: their prints are the task's.
    def shout(k):
        for j in range(200):
            sys.stdout.write(f"thread {k} line {j}\\n")  # one write a line: print() makes two
    await asyncio.gather(*(asyncio.to_thread(shout, k) for k in range(n)))
    return n

@queueable
async def interleaved(name, pause):
    for step in range(3):
        print(f"{name} step {step}")
        await asyncio.sleep(pause)
    return name
"""


def test_each_task_keeps_what_it_printed_and_a_failure_shows_its_own(worker_url):
    nb = notebook(CHATTY)
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(nb.fit, seed) for seed in range(4)], progress=False)
    pool = tq.spawn_workers(2, idle_exit=None)  # the default attempts: the failure is retried
    try:
        job.wait(timeout=60, progress=False)
    finally:
        pool.stop()
    for seed in (0, 1, 3):
        assert (
            job.output(seed) == f"seed {seed}: mean {_mean(seed):.3f}\nseed {seed}: warning, small sample\n"
        )
        assert job.records()[seed].output == job.output(seed)
    (error,) = job.errors()
    assert error.attempts == defaults.MAX_ATTEMPTS
    assert (
        error.output == f"seed 2: mean {_mean(2):.3f}\nseed 2: warning, small sample\n"
    )  # its last attempt's
    # The traceback starts in the notebook's function; the worker's frames are kept aside.
    assert error.traceback.startswith('Traceback (most recent call last):\n  File "<notebook>"'), (
        error.traceback
    )
    assert "nbqueue" not in error.traceback and "worker.py" in error.full_traceback
    assert error.full_traceback.endswith(error.traceback.splitlines()[-1] + "\n")
    # A second job beside the first: nothing to read before it ran.
    quiet = tq.insert([functools.partial(nb.fit, 9)], progress=False)
    assert quiet.output(0) is None


def _mean(seed: int) -> float:
    import numpy as np

    return float(np.random.default_rng(seed).normal(size=200).mean())


def test_output_is_bounded_to_its_last_characters_and_the_cli_prints_it(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    nb = notebook(CHATTY)
    tq = TaskQueue(url)
    job = tq.insert([functools.partial(nb.flood, 20_000), functools.partial(nb.flood, 2)], progress=False)
    assert wait_all(start_workers(url, 1, "--burst")) == [0]
    big = job.output(0)
    assert big.endswith("line 0019999\n") and "line 0000000" not in big
    assert big.startswith("[… ") and len(big) < defaults.OUTPUT_LIMIT + 100
    shown = subprocess.run(
        [sys.executable, "-m", "nbqueue", "job", url, job.id, "--output"], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert f"--- output of task 1 ({job.id}-1)\nline 0000000\nline 0000001" in shown.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "nbqueue", "job", url, job.id, "--output", "--json"],
        capture_output=True,
        text=True,
    )
    outputs = json.loads(as_json.stdout)["outputs"]
    assert [o["index"] for o in outputs] == [0, 1] and outputs[1]["output"] == "line 0000000\nline 0000001\n"


def test_async_tasks_run_side_by_side_keep_their_own_output(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    nb = notebook(CHATTY)
    tq = TaskQueue(url)
    job = tq.insert([functools.partial(nb.interleaved, name, 0.05) for name in "abc"], progress=False)
    assert wait_all(start_workers(url, 1, "--burst", "--concurrency", "3")) == [0]
    for i, name in enumerate("abc"):
        assert job.output(i) == "".join(f"{name} step {step}\n" for step in range(3))


def test_threads_a_task_hands_its_context_to_print_into_its_own_output(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    nb = notebook(CHATTY)
    job = TaskQueue(url).insert([functools.partial(nb.threaded, 4)], progress=False)
    assert wait_all(start_workers(url, 1, "--burst")) == [0]
    lines = job.output(0).splitlines()
    assert sorted(lines) == sorted(f"thread {k} line {j}" for k in range(4) for j in range(200))


def test_the_worker_terminal_shows_task_output_only_with_echo_output(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    nb = notebook(CHATTY)
    tq = TaskQueue(url)
    tq.insert([functools.partial(nb.flood, 2)], progress=False)
    quiet = subprocess.run(
        [sys.executable, "-m", "nbqueue", "worker", url, "--burst"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert quiet.returncode == 0 and "line 0000000" not in quiet.stdout + quiet.stderr
    job = tq.insert([functools.partial(nb.flood, 2)], progress=False)
    echoed = subprocess.run(
        [sys.executable, "-m", "nbqueue", "worker", url, "--burst", "--echo-output"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echoed.returncode == 0 and "line 0000000\nline 0000001\n" in echoed.stdout
    assert job.output(0) == "line 0000000\nline 0000001\n"  # kept all the same


def test_poll_in_the_callers_own_process_shows_task_output_there_and_keeps_it(capsys):
    # As python-task-queue's poll(): the caller's terminal (or cell) is where the tasks run.
    nb = notebook(CHATTY)
    tq = TaskQueue("mem://poll-output")
    job = tq.insert([functools.partial(nb.flood, 2)], progress=False)
    tq.poll(burst=True)
    assert "line 0000000\nline 0000001\n" in capsys.readouterr().out
    assert job.output(0) == "line 0000000\nline 0000001\n"
    quiet = tq.insert([functools.partial(nb.flood, 1)], progress=False)
    tq.poll(burst=True, echo_output=False)
    assert "line 0000000" not in capsys.readouterr().out and quiet.output(0) == "line 0000000\n"
