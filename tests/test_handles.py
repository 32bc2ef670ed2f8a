"""Single submits: ``fn.submit`` → TaskHandle, ``fn.map`` → Job, on the queue set by ``use``."""

from __future__ import annotations

import os

import pytest

import nbqueue
from nbqueue import QueueURLError, TaskFailed, TaskHandle, TaskQueue, TaskStatus
from nbqueue import handles as handles_module

from .helpers import notebook, run_python, start_workers, wait_all

NOTEBOOK = """
import os
from nbqueue import queueable, Terminal

BONUS = 10                     # a notebook global the task reads

def helper(x):                 # a notebook helper that is itself queueable
    return x * 2

helper = queueable(helper)

@queueable
def score(x, scale=2):
    return helper(x) * scale + BONUS, os.getpid()

@queueable
def refuse(reason):
    raise Terminal(reason)
"""


@pytest.fixture
def nb():
    return notebook(NOTEBOOK)


@pytest.fixture(autouse=True)
def no_default_queue(monkeypatch):
    """Each test starts without a default queue and without $NBQUEUE_URL."""
    monkeypatch.setattr(handles_module, "_default", None)
    monkeypatch.delenv("NBQUEUE_URL", raising=False)


def test_submit_ships_a_notebook_function_to_a_worker_process(worker_url, nb):
    nbqueue.use(worker_url)
    handle = nb.score.submit(3, scale=5)
    assert isinstance(handle, TaskHandle) and handle.task_id.endswith("-0")
    assert handle.status == TaskStatus.QUEUED and not handle.ready()
    with pytest.raises(TimeoutError, match="not finished after 0.2s"):
        handle.get(timeout=0.2)
    assert wait_all(start_workers(worker_url, 1, "--burst"), timeout=60) == [0]
    value, pid = handle.get(timeout=30)
    assert value == 3 * 2 * 5 + 10 and pid != os.getpid()
    assert handle.ready() and handle.status == TaskStatus.COMPLETED
    assert handle.job.name == "score" and handle.job.total == 1


def test_a_handle_reattaches_from_another_process(tmp_path, nb):
    url = f"fq://{tmp_path / 'queue'}"
    tq = nbqueue.use(url)
    handle = nb.score.submit(1)
    tq.poll(burst=True)
    out = run_python(
        f"""
        from nbqueue import TaskHandle, TaskQueue
        handle = TaskHandle(TaskQueue({url!r}), {handle.task_id!r})
        print(handle.status.value, handle.get(timeout=5)[0])
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["completed", "14"]


def test_get_raises_the_tasks_error_and_status_says_dead(nb):
    tq = nbqueue.use("mem://handles-failures")
    handle = nb.refuse.submit("no good")
    tq.poll(burst=True)
    assert handle.ready() and handle.status == TaskStatus.DEAD
    with pytest.raises(TaskFailed, match="no good") as info:
        handle.get()
    (error,) = info.value.errors
    assert error.type == "Terminal" and error.task_id == handle.task_id
    tq.purge_dead()
    assert handle.status == TaskStatus.DEAD  # its error record remains: still a failure


def test_map_queues_one_job_of_the_items(nb):
    tq = nbqueue.use("mem://handles-map")
    job = nb.score.map(range(4), name="scores", progress=False)
    assert job.name == "scores" and job.total == 4
    tq.poll(burst=True)
    assert [value for value, _ in job.wait(timeout=5, progress=False).results()] == [10, 14, 18, 22]
    generated = nb.helper.map((x for x in (5, 6)), progress=False)
    tq.poll(burst=True)
    assert generated.wait(timeout=5, progress=False).results() == [10, 12]


def test_default_queue_comes_from_the_environment_else_a_clear_error(nb, monkeypatch):
    with pytest.raises(QueueURLError, match=r"nbqueue.use\(URL\) or set \$NBQUEUE_URL"):
        nb.score.submit(1)
    monkeypatch.setenv("NBQUEUE_URL", "mem://handles-from-env")
    handle = nb.score.submit(2)
    assert handle.queue.url == "mem://handles-from-env"
    handle.queue.poll(burst=True)
    assert handle.get()[0] == 18


def test_unknown_task_ids_are_refused():
    tq = TaskQueue("mem://handles-unknown")
    handle = TaskHandle(tq, "nojob-0")
    with pytest.raises(KeyError, match="no task 'nojob-0'"):
        handle.get(timeout=1)
    with pytest.raises(KeyError):
        handle.status  # noqa: B018 - the property is what raises
    with pytest.raises(ValueError, match="invalid task id"):
        TaskHandle(tq, "../x")


def test_map_takes_insert_options_a_priority_among_them(tmp_path, nb):
    tq = nbqueue.use(f"fq://{tmp_path / 'queue'}")
    tq.progress = False
    later = nb.score.map(range(20))
    first = nb.score.map([100, 200], priority=2, name="urgent")
    assert first.name == "urgent" and first.meta["priority"] == 2
    assert tq.poll(max_tasks=2).completed == 2
    assert [value for value, _ in first.results()] == [410, 810]
    assert later.counts().completed == 0
