"""cp/mv between queues: everything the source holds arrives, re-signed; a copy that would lose
or duplicate tasks is refused before anything is written."""

from __future__ import annotations

import functools
import uuid

import pytest

from nbqueue import TaskQueue, TransferRefused
from nbqueue.transfer import copy_queue, move_queue

from .helpers import notebook

NB = """
from nbqueue import queueable, Terminal

@queueable
def check(i):
    if i == 1:
        raise Terminal("one is refused")
    return i * 10
"""


def _filled():
    nb = notebook(NB)
    src = TaskQueue(f"mem://src-{uuid.uuid4().hex}")
    done = src.insert((functools.partial(nb.check, i) for i in range(3)), name="done", progress=False)
    src.poll(burst=True)
    waiting = src.insert(
        (functools.partial(nb.check, i) for i in range(2, 5)), name="waiting", progress=False
    )
    return src, done, waiting


def test_copy_keeps_jobs_results_dead_letters_and_queued_tasks(tmp_path):
    src, done, waiting = _filled()
    dst = TaskQueue(f"fq://{tmp_path / 'dst'}")
    report = copy_queue(src, dst)
    assert (report.jobs, report.completed, report.dead, report.queued) == (2, 2, 1, 3)
    assert [j.name for j in dst.jobs()] == ["done", "waiting"]
    assert dst.job(done.id).results(on_error="none") == [0, None, 20]
    assert [d.task_id for d in dst.dead()] == [f"{done.id}-1"]
    dst.poll(burst=True)  # the copied tasks were signed again for the destination, so they run there
    assert dst.job(waiting.id).wait(timeout=10, progress=False).results() == [20, 30, 40]
    assert src.status().queued == 3  # a copy leaves the source as it was


def test_move_empties_the_source_and_a_second_copy_is_refused(tmp_path):
    src, done, _ = _filled()
    dst = TaskQueue(f"fq://{tmp_path / 'dst'}")
    copy_queue(src, dst)
    before = dst.status()
    with pytest.raises(TransferRefused, match=f"already has job {done.id}"):
        copy_queue(src, dst)
    assert dst.status() == before  # refused before anything was written
    other = TaskQueue(f"fq://{tmp_path / 'other'}")
    move_queue(src, other)
    assert src.jobs() == [] and src.status().queued == 0
    assert len(other.jobs()) == 2


def test_leased_tasks_are_refused_unless_forced(tmp_path):
    src, _, waiting = _filled()
    src.backend.lease(1, 60)
    dst = TaskQueue(f"fq://{tmp_path / 'dst'}")
    with pytest.raises(TransferRefused, match="1 task\\(s\\) leased"):
        copy_queue(src, dst)
    assert dst.jobs() == []
    report = copy_queue(src, dst, force=True)
    assert report.queued + report.leased == 3
    dst.poll(burst=True)
    assert dst.job(waiting.id).wait(timeout=10, progress=False).results() == [20, 30, 40]
    with pytest.raises(TransferRefused, match="both the source and the destination"):
        copy_queue(dst, dst)
