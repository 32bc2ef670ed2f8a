"""The insert pipeline: sliced multiprocess uploads, pipelined generators, green uploads."""

from __future__ import annotations

import functools
import os
from concurrent.futures.process import BrokenProcessPool

import pytest

from nbqueue import TaskQueue

from .helpers import notebook, run_python

# A python-task-queue-style task iterator, defined as a notebook would define it. Iterating a
# slice records which process built its tasks.
NOTEBOOK = """
import os
from functools import partial
from nbqueue import queueable

@queueable
def square(i):
    return i * i

class SquareTasks:
    def __init__(self, start, stop, log=None, fail_at=None, die_at=None):
        self.start, self.stop, self.log = start, stop, log
        self.fail_at, self.die_at = fail_at, die_at
    def __len__(self):
        return self.stop - self.start
    def __getitem__(self, part):
        lo, hi, _ = part.indices(len(self))
        return SquareTasks(self.start + lo, self.start + hi, self.log, self.fail_at, self.die_at)
    def __iter__(self):
        if self.log:
            with open(os.path.join(self.log, f"{os.getpid()}-{self.start}"), "w"):
                pass
        for i in range(self.start, self.stop):
            if i == self.fail_at:
                raise ValueError(f"task {i} cannot be built")
            if i == self.die_at:
                os._exit(3)
            yield partial(square, i)
"""


@pytest.fixture(scope="module")
def nb():
    return notebook(NOTEBOOK)


def test_parallel_slices_are_built_and_uploaded_by_child_processes(worker_url, nb, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    tq = TaskQueue(worker_url)
    job = tq.insert(nb.SquareTasks(0, 3000, log=str(log)), parallel=2, batch_size=400, progress=False)
    assert job.total == 3000 and job.counts().inserted == 3000
    builders = {name.split("-")[0] for name in os.listdir(log)}
    starts = sorted(int(name.split("-")[1]) for name in os.listdir(log))
    assert starts == [0, 1500] and len(builders) == 2 and str(os.getpid()) not in builders
    tq.poll()
    assert job.results() == [i * i for i in range(3000)]


def test_parallel_child_exception_reaches_the_caller_with_an_exact_total(nb, tmp_path):
    tq = TaskQueue(f"fq://{tmp_path / 'queue'}")
    with pytest.raises(ValueError, match="task 2500 cannot be built") as info:
        tq.insert(nb.SquareTasks(0, 3000, fail_at=2500), parallel=2, batch_size=250, progress=False)
    assert "Traceback" in str(info.value.__cause__)  # the child's own traceback travels along
    (job,) = tq.jobs()
    assert job.meta["state"] == "insert_failed"
    assert job.total == job.counts().inserted == tq.status().queued
    assert 1000 <= job.total < 3000


def test_parallel_dead_child_raises_instead_of_hanging(nb, tmp_path):
    tq = TaskQueue(f"fq://{tmp_path / 'queue'}")
    with pytest.raises(BrokenProcessPool):
        tq.insert(nb.SquareTasks(0, 2000, die_at=1700), parallel=2, batch_size=100, progress=False)
    (job,) = tq.jobs()
    assert job.total == job.counts().inserted


def test_parallel_generator_streams_through_writer_threads(worker_url, nb):
    tq = TaskQueue(worker_url)
    job = tq.insert(
        (functools.partial(nb.square, i) for i in range(2500)), parallel=3, batch_size=100, progress=False
    )
    assert job.total == 2500
    tq.poll()
    assert job.results() == [i * i for i in range(2500)]


def test_parallel_generator_failure_keeps_an_exact_total(nb, tmp_path):
    tq = TaskQueue(f"fq://{tmp_path / 'queue'}")

    def tasks():
        for i in range(1000):
            if i == 750:
                raise KeyError("boom")
            yield functools.partial(nb.square, i)

    with pytest.raises(KeyError):
        tq.insert(tasks(), parallel=2, batch_size=100, progress=False)
    (job,) = tq.jobs()
    assert job.total == job.counts().inserted == 700


def test_green_without_monkey_patching_says_how_and_queues_nothing(nb, tmp_path):
    tq = TaskQueue(f"fq://{tmp_path / 'queue'}")
    with pytest.raises(RuntimeError, match=r"monkey\.patch_all\(\)"):
        tq.insert([functools.partial(nb.square, 1)], green=True, progress=False)
    assert tq.jobs() == [] and tq.status().inserted == 0


def test_green_upload_in_a_patched_process(redis_url):
    script = """
from gevent import monkey
monkey.patch_all()
import functools, sys
from nbqueue import TaskQueue, queueable

@queueable
def square(i):
    return i * i

tq = TaskQueue(sys.argv[1])
job = tq.insert((functools.partial(square, i) for i in range(3000)), green=True, batch_size=100,
                progress=False)
tq.poll()
assert job.results() == [i * i for i in range(3000)], "wrong results"
print("ok", job.total)
"""
    done = run_python(script, redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "3000"]
