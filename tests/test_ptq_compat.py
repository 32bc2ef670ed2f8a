"""A python-task-queue script runs on nbqueue with only its import changed.

The README listings of python-task-queue (``task-queue`` on PyPI) run verbatim as scripts in
fresh interpreters, with ``taskqueue`` replaced by ``nbqueue``, the queue URL pointed at a real
queue and the million tasks scaled down; then the queue is checked to hold exactly their tasks and
a worker runs them all. The other tests pin each call python-task-queue users make to the meaning
it has there, on fq:// and redis://.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nbqueue import (
    FunctionTask,
    LocalTaskQueue,
    NotLeasedHere,
    NotQueueableError,
    QueueEmptyError,
    RegisteredTask,
    TaskQueue,
    queueable,
)

from .helpers import start_workers, wait_all, wait_for

# -- the listings ----------------------------------------------------------------------------------
# python-task-queue's README defines PrintTask in "mylibrary" (its "Old School" section) and
# print_task (its "New School" section); the listings import them from there.
MYLIBRARY = """
from nbqueue import RegisteredTask, queueable

class PrintTask(RegisteredTask):
  def __init__(self, txt=''):
    super(PrintTask, self).__init__(txt)
    # attributes passed to super().__init__ are automatically assigned
    # use this space to perform additional processing such as:
    self.txt = str(txt)

  def execute(self):
    if self.txt:
      print(str(self) + ": " + self.txt)
    else:
      print(self)

@queueable
def print_task(txt):
  print(str(txt))
"""

# The listings as python-task-queue's README has them, with one import line added where a
# listing uses PrintTask without saying where it comes from (the README's own convention:
# "from mylibrary import PrintTask").
LISTINGS = {
    1: """
from taskqueue import TaskQueue
from mylibrary import PrintTask
tasks = [ PrintTask(i) for i in range(1000000) ]
tq = TaskQueue('sqs://queue-name')
for task in tasks:
  tq.insert(task)
""",
    2: """
from taskqueue import TaskQueue
from mylibrary import PrintTask
tasks = [ PrintTask(i) for i in range(1000000) ]
tq = TaskQueue('sqs://queue-name')
tq.insert(tasks)
""",
    3: """
from taskqueue import TaskQueue
from mylibrary import PrintTask
tasks = ( PrintTask(i) for i in range(1000000) )
tq = TaskQueue('sqs://queue-name')
tq.insert(tasks, total=1000000) # total necessary for progress bars to work
""",
    4: """
import gevent.monkey
gevent.monkey.patch_all()
from taskqueue import TaskQueue
from mylibrary import PrintTask

tasks = ( PrintTask(i) for i in range(1000000) )
tq = TaskQueue('sqs://queue-name', green=True)
tq.insert(tasks, total=1000000) # total helps the progress bar
""",
    5: """
import gevent.monkey
gevent.monkey.patch_all()
from taskqueue import TaskQueue
from concurrent.futures import ProcessPoolExecutor
from mylibrary import PrintTask

def upload(args):
  start, end = args
  tasks = ( PrintTask(i) for i in range(start, end) )
  tq = TaskQueue('sqs://queue-name', green=True)
  tq.insert(tasks, total=(end - start))

task_ranges = [ (0, 250000), (250000, 500000), (500000, 750000), (750000, 1000000) ]
with ProcessPoolExecutor(max_workers=4) as pool:
  pool.map(upload, task_ranges)
""",
    6: """
import gevent.monkey
gevent.monkey.patch_all()
from taskqueue import TaskQueue
from concurrent.futures import ProcessPoolExecutor
from mylibrary import PrintTask

class PrintTaskIterator(object):
  def __init__(self, start, end):
    self.start = start
    self.end = end
  def __len__(self):
    return self.end - self.start
  def __iter__(self):
    for i in range(self.start, self.end):
      yield PrintTask(i)

def upload(tsks):
  tq = TaskQueue('sqs://queue-name', green=True)
  tq.insert(tsks)

tasks = [ PrintTaskIterator(0, 100), PrintTaskIterator(100, 200) ]
with ProcessPoolExecutor(max_workers=2) as execute:
  execute.map(upload, tasks)
""",
    7: """
import gevent.monkey
gevent.monkey.patch_all(thread=False)
import copy
from taskqueue import TaskQueue
from mylibrary import PrintTask

class PrintTaskIterator(object):
  def __init__(self, start, end):
    self.start = start
    self.end = end
  def __getitem__(self, slc):
    itr = copy.deepcopy(self)
    itr.start = self.start + slc.start
    itr.end = self.start + slc.stop
    return itr
  def __len__(self):
    return self.end - self.start
  def __iter__(self):
    for i in range(self.start, self.end):
      yield PrintTask(i)

tq = TaskQueue('sqs://queue-name', green=True)
tq.insert(PrintTaskIterator(0,200), parallel=2)
""",
}

#: A million tasks is python-task-queue's scale; these many keep the suite quick.
SCALE = {"1000000": "400", "750000": "300", "500000": "200", "250000": "100"}
EXPECTED = {1: 400, 2: 400, 3: 400, 4: 400, 5: 400, 6: 200, 7: 200}


def as_nbqueue(source: str, url: str) -> str:
    """A listing with only its import changed, its queue pointed at ``url`` and scaled down."""
    source = source.replace("from taskqueue import", "from nbqueue import")
    source = source.replace("'sqs://queue-name'", repr(url))
    return re.sub(r"\b(1000000|750000|500000|250000)\b", lambda m: SCALE[m.group(1)], source)


def run_script(directory, name: str, source: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``source`` as ``python name`` in ``directory`` (next to mylibrary.py), a fresh
    interpreter, as its user would."""
    (directory / "mylibrary.py").write_text(MYLIBRARY)
    (directory / name).write_text(textwrap.dedent(source))
    done = subprocess.run(
        [sys.executable, name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=line_buffered(directory),
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done


def line_buffered(directory) -> dict[str, str]:
    """An environment whose Python processes (spawned children too) write stdout a line at a
    time, as on a terminal: lines that several processes print into one pipe stay whole."""
    (directory / "sitecustomize.py").write_text("import sys\nsys.stdout.reconfigure(line_buffering=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a write per print() part
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return env


def printed_by_print_task(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("PrintTask(")]


@pytest.mark.slow
@pytest.mark.parametrize("number", sorted(LISTINGS))
def test_python_task_queue_readme_listing_runs_unchanged(number, redis_url, tmp_path):
    """Listings 1-7 (written for sqs://; here on redis://, the network queue) queue exactly their
    tasks, as PrintTask objects, and a worker runs every one."""
    run_script(tmp_path, f"listing{number}.py", as_nbqueue(LISTINGS[number], redis_url))
    tq = TaskQueue(redis_url)
    expected = EXPECTED[number]
    assert tq.enqueued == expected and tq.inserted == expected
    listed = tq.list()
    assert len(listed) == expected
    assert all(type(task).__name__ == "PrintTask" for task in listed)
    assert sorted(int(task.txt) for task in listed) == list(range(expected))  # each once
    if number == 7:  # the sliced insert: one job, uploaded by two processes
        (job,) = tq.jobs()
        assert job.total == 200
        (worker,) = start_workers(redis_url, 1, "--burst", cwd=tmp_path)
        assert wait_all([worker]) == [0]
    else:
        tq.poll(burst=True)
    counts = tq.status()
    assert (counts.completed, counts.dead, tq.enqueued) == (expected, 0, 0)
    assert tq.is_empty()


LOCAL_USAGE = """
from functools import partial
from taskqueue import LocalTaskQueue
from mylibrary import PrintTask, print_task # mylibrary is wherever you defined PrintTask

tq = LocalTaskQueue(parallel=5) # use 5 processes


tasks = ( PrintTask(i) for i in range(2000) ) # OLD SCHOOL
tq.insert_all(tasks) # performs on-line execution (naming is historical)
tasks = ( partial(print_task, i) for i in range(2000) ) # NEW SCHOOL

tq.insert_all(tasks) # performs on-line execution (naming is historical)

# alterternative serial model
tasks = ( PrintTask(i) for i in range(5000, 5010) )
tq.insert(tasks)
tq.execute()

# delete tasks
tq.delete(tasks)
tq.purge() # delete all tasks
"""


@pytest.mark.slow
def test_local_usage_runs_every_task_in_five_processes(tmp_path):
    """python-task-queue's "Local Usage" section (each task list inserted, not only the last)."""
    done = run_script(tmp_path, "local.py", as_nbqueue(LOCAL_USAGE, "unused").replace("2000", "300"))
    out = done.stdout.splitlines()
    assert sorted(printed_by_print_task(done.stdout)) == sorted(
        [f"PrintTask(txt='{i}'): {i}" for i in range(300)]
        + [f"PrintTask(txt='{i}'): {i}" for i in range(5000, 5010)]
    )
    assert sorted(int(line) for line in out if line.isdigit()) == list(range(300))


CLOUD_USAGE = """
from functools import partial
from taskqueue import TaskQueue
from mylibrary import PrintTask, print_task # mylibrary is wherever you defined PrintTask

tq = TaskQueue('fq://QUEUE') # file queue ('fq')

# insert accepts any iterable
tq.insert(( PrintTask(i) for i in range(1000) )) # OLD SCHOOL
tq.insert(( partial(print_task, i) for i in range(1000) )) # NEW SCHOOL
print("enqueued", tq.enqueued) # approximate number of tasks in the queue

# FileQueue Only:
print("inserted", tq.inserted) #  total number of tasks inserted
print("completed", tq.completed) # number of tasks completed, requires tally=True with poll
"""

CLOUD_WORKER = """
from taskqueue import TaskQueue
import mylibrary # MY_MODULE contains the definitions of RegisteredTasks

LEASE_SECONDS = 60
tq = TaskQueue('fq://QUEUE')
tq.poll(
  lease_seconds=int(LEASE_SECONDS),
  verbose=True, # print out a success message
  tally=True, # count number of tasks completed (fq only!)
)
"""


@pytest.mark.slow
def test_cloud_usage_insert_then_a_polling_worker_that_runs_until_interrupted(tmp_path):
    """The "Cloud and Cluster Usage" section on fq://: the producer, then the worker script,
    which polls until Ctrl-C (as there) and stops after its running task when interrupted."""
    queue = tmp_path / "queue"
    done = run_script(tmp_path, "insert.py", as_nbqueue(CLOUD_USAGE, "").replace("QUEUE", str(queue)))
    assert done.stdout.split() == ["enqueued", "2000", "inserted", "2000", "completed", "0"]
    (tmp_path / "worker.py").write_text(as_nbqueue(CLOUD_WORKER, "").replace("QUEUE", str(queue)))
    with open(tmp_path / "out", "w") as out_file, open(tmp_path / "err", "w") as err_file:
        worker = subprocess.Popen(
            [sys.executable, "worker.py"], cwd=tmp_path, stdout=out_file, stderr=err_file
        )
    tq = TaskQueue(f"fq://{queue}")
    try:
        wait_for(lambda: tq.completed == 2000, timeout=120, what="the worker to run every task")
        time.sleep(1.0)
        assert worker.poll() is None, "poll() returned with the queue empty: it polls until told to stop"
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=30)
    finally:
        worker.kill()
        worker.wait()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert worker.returncode == 0, err
    assert "interrupted: stopping after the running task" in err
    assert len([line for line in out.splitlines() if line.startswith("nbqueue: ran ")]) == 2000  # verbose
    assert len(printed_by_print_task(out)) == 1000
    assert (tq.status().completed, tq.status().dead, tq.enqueued) == (2000, 0, 0)


# -- the meanings, one call at a time ---------------------------------------------------------------
@queueable
def slow_square(x: int, seconds: float = 0.0) -> int:
    time.sleep(seconds)
    return x * x


@queueable
def pid_of(_: int) -> int:
    return os.getpid()


class Scaled(RegisteredTask):
    def __init__(self, factor, offset=0):
        super().__init__(factor, offset=offset)

    def execute(self, x=1):
        return self.factor * x + self.offset


class Array:
    """Stands in for a numpy array: payload() calls ``tolist``, as python-task-queue's does."""

    def __init__(self, items):
        self.items = items

    def tolist(self):
        return list(self.items)


def test_registered_task_payload_round_trip_and_repr():
    task = Scaled(3, offset=Array((1, 2)))
    assert (task.factor, task.offset.items) == (3, (1, 2))  # arguments became attributes
    task.factor = 4  # the payload has the current values, as there
    assert task.payload() == {"factor": 4, "offset": [1, 2], "class": "Scaled"}
    again = RegisteredTask.deserialize(__import__("json").dumps(task.payload()))
    assert isinstance(again, Scaled) and (again.factor, again.offset) == (4, [1, 2])
    assert Scaled.deserialize({"factor": 2, "class": "Scaled"}).execute(5) == 10
    assert repr(again) == "Scaled(factor=4, offset=[1, 2])"
    assert again.id == -1
    with pytest.raises(NotQueueableError, match="no Scaled subclass named 'Nope'"):
        Scaled.deserialize({"class": "Nope"})


def test_enqueued_counts_leased_tasks_and_a_while_loop_waits_for_running_ones(worker_url, tmp_path):
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(functools.partial(slow_square, i, 1.0) for i in range(2))
    (worker,) = start_workers(worker_url, 1, "--burst")
    try:
        wait_for(lambda: tq.leased > 0, what="a lease")
        assert tq.enqueued == 2  # one leased (running) and one queued, or both leased
        while tq.enqueued > 0:
            time.sleep(0.05)
        assert tq.completed == 2 and job.results() == [0, 1]
    finally:
        wait_all([worker])


def test_release_all_releases_live_leases_uncharged_and_fences_the_old_holder(worker_url):
    tq = TaskQueue(worker_url, progress=False)
    tq.insert(functools.partial(slow_square, i) for i in range(2))
    first = tq.lease(seconds=600, num_tasks=2)
    assert tq.release_expired() == 0  # nothing expired: the safe verb leaves them
    assert tq.release_all() == 2  # python-task-queue's: every lease
    other = TaskQueue(worker_url)
    again = other.lease(seconds=600, num_tasks=2)
    assert sorted(t.id for t in again) == sorted(t.id for t in first)
    for task in first:
        task.execute()
    assert tq.delete(first) == 0  # the old leases are void: their commits are refused
    for task in again:
        task.execute()
    assert other.delete(again) == 2
    (job,) = tq.jobs()
    assert job.results() == [0, 1]
    assert [e for e in job.errors()] == []
    assert tq.dead() == []


def test_lease_execute_renew_delete_by_hand(worker_url):
    tq = TaskQueue(worker_url, progress=False)
    with pytest.raises(QueueEmptyError):
        tq.lease()
    job = tq.insert([functools.partial(slow_square, 7), Scaled(2, offset=1)])
    first = tq.lease(seconds=1)
    assert tq.renew(first, 30) is True
    second = tq.lease(seconds=1)
    time.sleep(1.5)  # the second lease ends; the renewed first does not
    (back,) = [tq.lease(seconds=30)]
    assert back.id == second.id  # it went back to the queue
    with pytest.raises(QueueEmptyError):
        tq.lease(wait_sec=0.2)
    assert tq.delete(second) == 0  # fenced: that lease ended
    for task in (first, back):
        if isinstance(task, FunctionTask):
            assert task.execute() == 49
        else:
            assert isinstance(task, Scaled) and task.id.startswith(job.id)
            task.execute()
    assert tq.delete([first, back]) == 2
    assert tq.delete("nonexistent") == 0  # gone already: nothing to do, as there
    assert tq.is_empty() and job.results() == [49, None]
    with pytest.raises(NotLeasedHere):
        tq.renew(first, 30)


def test_delete_or_renew_of_a_task_leased_elsewhere_is_refused_and_loses_nothing(worker_url):
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(functools.partial(slow_square, 3))
    (queued,) = tq.list()
    with pytest.raises(NotLeasedHere, match="queued, not leased by this TaskQueue"):
        tq.delete(queued)
    held = TaskQueue(worker_url).lease()
    with pytest.raises(NotLeasedHere, match="leased, not leased by this TaskQueue"):
        tq.delete(held.id)
    with pytest.raises(NotLeasedHere):
        tq.renew(held, 10)
    assert tq.enqueued == 1
    tq.release_all()
    tq.poll(burst=True)
    assert job.results() == [9]


def test_list_verifies_before_loading_and_lease_dead_letters_a_forged_task(worker_url):
    tq = TaskQueue(worker_url, progress=False)
    tq.insert(functools.partial(slow_square, i) for i in range(3))
    tq.lease()  # leased tasks are listed too
    forged = "forgedjob-0"
    tq.backend.insert("forgedjob", [(forged, b"not an envelope")])
    with pytest.warns(UserWarning, match=f"task {forged} skipped"):
        listed = tq.list()
    assert sorted(t.args[0] for t in listed) == [0, 1, 2]
    assert all(isinstance(t, FunctionTask) for t in listed)
    while True:
        try:
            tq.lease(num_tasks=5)
        except QueueEmptyError:
            break
    assert [letter.task_id for letter in tq.dead()] == [forged]


def test_poll_stop_fn_gets_what_it_names_and_verbose_prints_each_task(worker_url, capsys):
    tq = TaskQueue(worker_url, progress=False)
    tq.insert(functools.partial(slow_square, i) for i in range(10))
    seen = []

    def stop_fn(executed, elapsed_time):
        seen.append((executed, elapsed_time))
        return executed >= 4

    stats = tq.poll(stop_fn=stop_fn, verbose=True)
    assert stats.completed == 4 and tq.enqueued == 6  # the rest of its batch went back
    assert [n for n, _ in seen] == [1, 2, 3, 4]
    assert all(t >= 0 for _, t in seen)
    assert capsys.readouterr().out.count("nbqueue: ran ") == 4
    tq.poll(stop_fn=lambda tries: tries >= 3)  # three empty leases in a row
    assert tq.is_empty()
    with pytest.raises(ValueError, match="may take only executed"):
        tq.poll(stop_fn=lambda count: True)


def test_poll_polls_until_told_to_stop(worker_url):
    """Without burst, an empty queue does not end poll(): a task inserted later still runs."""
    tq = TaskQueue(worker_url, progress=False)
    stop = threading.Event()
    stats = {}
    poller = threading.Thread(target=lambda: stats.update(done=tq.poll(stop_event=stop)))
    poller.start()
    try:
        time.sleep(1.5)
        assert poller.is_alive()
        job = TaskQueue(worker_url, progress=False).insert(functools.partial(slow_square, 5))
        assert job.wait(timeout=30, progress=False) and job.results() == [25]
    finally:
        stop.set()
        poller.join(30)
    assert stats["done"].completed == 1


def test_insert_one_task_of_each_kind_and_call_tuples(worker_url):
    tq = TaskQueue(worker_url, progress=False)
    jobs = [
        tq.insert(functools.partial(slow_square, 2)),
        tq.insert(Scaled(3, offset=1)),
        tq.insert(
            [(slow_square, [4], {}), (Scaled(10), [2], {}), (functools.partial(slow_square), (), {"x": 6})]
        ),
    ]
    tq.poll(burst=True)
    assert [job.results() for job in jobs] == [[4], [4], [16, 20, 36]]
    with pytest.raises(TypeError, match="execute"):
        tq.insert([(Scaled(1), [1, 2, 3], {})])


def test_insert_another_queue_copies_its_tasks(worker_url, tmp_path):
    source = TaskQueue(f"fq://{tmp_path / 'source'}", progress=False)
    source.insert(functools.partial(slow_square, i) for i in range(5))
    source.insert(Scaled(2) for _ in range(2))
    tq = TaskQueue(worker_url, progress=False)
    job = tq.insert(source)
    assert job.total == 7 and source.enqueued == 7  # the source keeps its tasks
    tq.poll(burst=True)
    assert sorted(job.results()) == [0, 1, 2, 2, 4, 9, 16]
    with pytest.raises(ValueError, match="into itself"):
        tq.insert(TaskQueue(worker_url))


def test_delay_seconds_holds_tasks_back_until_due(worker_url):
    tq = TaskQueue(worker_url, progress=False)
    (worker,) = start_workers(worker_url, 1, "--idle-exit", "10")
    try:
        inserted = time.time()
        job = tq.insert((functools.partial(slow_square, i) for i in range(3)), delay_seconds=2)
        time.sleep(1.0)
        assert (tq.status().scheduled, tq.status().queued, tq.completed) == (3, 0, 0)
        assert job.wait(timeout=30, progress=False)
        assert job.results() == [0, 1, 4]
        assert min(r.started for r in job.records()) >= inserted + 1.9
    finally:
        worker.terminate()
        wait_all([worker])
    with pytest.raises(ValueError, match="negative"):
        tq.insert(functools.partial(slow_square, 1), delay_seconds=-1)


def test_green_is_a_constructor_option(worker_url):
    """Without gevent's monkey patch the green queue refuses at insert and queues nothing."""
    tq = TaskQueue(worker_url, green=True, progress=False)
    with pytest.raises(RuntimeError, match="monkey.patch_all"):
        tq.insert(functools.partial(slow_square, i) for i in range(3))
    assert tq.enqueued == 0


@pytest.mark.slow
def test_local_task_queue_parallel_true_uses_one_process_per_cpu():
    tq = LocalTaskQueue(parallel=True, progress=False)
    assert tq.parallel == os.cpu_count()
    job = tq.insert(functools.partial(pid_of, i) for i in range(40))
    pids = set(job.results())
    assert os.getpid() not in pids  # every task ran in the pool's processes
    # python-task-queue's own test: (task object, args, kwargs) tuples run in the pool
    job = tq.insert_all((Scaled(2), [i], {}) for i in range(20))
    assert job.results() == [2 * i for i in range(20)]
