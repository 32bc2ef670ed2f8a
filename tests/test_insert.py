"""The insert pipeline: sliced multiprocess uploads, pipelined generators, green uploads."""

from __future__ import annotations

import functools
import os
import time
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
    tq.poll(burst=True)
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
    tq.poll(burst=True)
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
tq.poll(burst=True)
assert job.results() == [i * i for i in range(3000)], "wrong results"
print("ok", job.total)
"""
    done = run_python(script, redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "3000"]


SLICES = """
from functools import partial
from nbqueue import queueable

@queueable
def double(i):
    return 2 * i

class IgnoresBounds:
    # python-task-queue's own test iterator: slicing returns the whole thing.
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, part):
        return self
    def __iter__(self):
        return (partial(double, i) for i in range(self.n))

class Off:
    # Slices with no len() that yield `extra` tasks more (or fewer) than they should.
    def __init__(self, lo, hi, extra):
        self.lo, self.hi, self.extra = lo, hi, extra
    def __len__(self):
        return self.hi - self.lo
    def __getitem__(self, part):
        lo, hi, _ = part.indices(len(self))
        return OffSlice(self.lo + lo, self.lo + hi, self.extra)
    def __iter__(self):
        return (partial(double, i) for i in range(self.lo, self.hi))

class OffSlice:
    def __init__(self, lo, hi, extra):
        self.lo, self.hi, self.extra = lo, hi, extra
    def __iter__(self):
        return (partial(double, i) for i in range(self.lo, self.hi + self.extra))
"""


@pytest.fixture(scope="module")
def slices():
    return notebook(SLICES)


def test_a_slice_that_ignores_its_bounds_is_refused_before_anything_is_queued(worker_url, slices):
    from nbqueue import SliceContractError

    tq = TaskQueue(worker_url)
    with pytest.raises(SliceContractError, match=r"len\(tasks\[0:2\]\) is 4, not 2; nothing was queued"):
        tq.insert(slices.IgnoresBounds(4), parallel=2, progress=False)
    assert tq.status().inserted == 0 and tq.jobs() == []


@pytest.mark.parametrize(
    "extra,message,queued",
    [
        (1, "yielded more than 50 tasks", range(100)),
        (-1, "yielded 49 tasks, not 50", [*range(40), *range(50, 90)]),
    ],
)
def test_a_slice_that_yields_more_or_fewer_stops_the_insert_with_an_exact_total(
    worker_url, slices, extra, message, queued
):
    """Each child checks what its slice yields: it never writes a task past its slice (that id is
    the next slice's) and stops before its last batch when the slice comes up short."""
    from nbqueue import SliceContractError

    tq = TaskQueue(worker_url)
    with pytest.raises(SliceContractError, match=message):
        tq.insert(slices.Off(0, 100, extra), parallel=2, batch_size=10, progress=False)
    (job,) = tq.jobs()
    assert job.total == job.counts().inserted == len(queued)
    tq.poll(burst=True)
    records = job.wait(timeout=30, progress=False).records()  # the total is reachable
    assert [r.task_id for r in records] == [f"{job.id}-{i}" for i in queued]  # no duplicate ids
    assert [r.value for r in records] == [2 * i for i in queued]


def test_exact_slices_insert_every_task_once_and_memory_queues_never_slice(backend_url, slices):
    tq = TaskQueue(backend_url)
    job = tq.insert(slices.Off(0, 100, 0), parallel=2, progress=False)
    tq.poll(burst=True)
    assert job.wait(timeout=30, progress=False).results() == [2 * i for i in range(100)]
    if backend_url.startswith("mem://"):  # mem:// reads the iterable here, so even this one works
        job = tq.insert(slices.IgnoresBounds(4), parallel=2, progress=False)
        tq.poll(burst=True)
        assert job.wait(timeout=30, progress=False).results() == [0, 2, 4, 6]


NO_MAIN_GUARD = """
import functools, sys
from nbqueue import LocalTaskQueue, TaskQueue, queueable

@queueable
def double(i):
    return 2 * i

class Tasks:
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi
    def __len__(self):
        return self.hi - self.lo
    def __getitem__(self, part):
        lo, hi, _ = part.indices(len(self))
        return Tasks(self.lo + lo, self.lo + hi)
    def __iter__(self):
        return (functools.partial(double, i) for i in range(self.lo, self.hi))

print("script body ran", file=sys.stderr)
tq = TaskQueue(sys.argv[1])
job = tq.insert(Tasks(0, 40), parallel=2, progress=False)
tq.poll(burst=True)
print(job.wait(timeout=60, progress=False).results() == [2 * i for i in range(40)])
local = LocalTaskQueue(parallel=2, progress=False)
print(local.insert([functools.partial(double, i) for i in range(10)]).results())
"""


def test_a_script_without_a_main_guard_inserts_in_parallel_and_runs_local_processes(tmp_path):
    """Written the way python-task-queue's README writes its listings: no __main__ guard. The
    spawned children never run the script (it would start them again, and fail)."""
    import subprocess
    import sys

    script = tmp_path / "listing.py"
    script.write_text(NO_MAIN_GUARD)
    done = subprocess.run(
        [sys.executable, str(script), f"fq://{tmp_path / 'q'}"], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["True", str([2 * i for i in range(10)])]
    assert done.stderr.count("script body ran") == 1  # children did not run the script again


def test_a_delay_counts_from_the_insert_not_from_each_batch_write(backend_url, nb):
    """A slow generator writes its second batch a second after the first: both are ready 1.5 s
    after the insert began (as an eta would have it), not 1.5 s after their own write."""
    tq = TaskQueue(backend_url, progress=False)

    def tasks():
        yield functools.partial(nb.square, 1)
        time.sleep(1.0)
        yield functools.partial(nb.square, 2)

    began = time.time()
    tq.insert(tasks(), batch_size=1, delay=1.5)
    assert tq.status().scheduled == 2 and tq.backend.lease(10, 30) == []
    time.sleep(max(began + 1.8 - time.time(), 0))
    assert len(tq.backend.lease(10, 30)) == 2
