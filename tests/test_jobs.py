"""Job: the record (JobState, wire keys), reattaching, totals, snapshots, results and errors."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

from nbqueue import PENDING, Job, TaskFailed, TaskQueue
from nbqueue.jobs import JobState, new_job_record, save_job_record

from .helpers import notebook

NB = """
from nbqueue import queueable, Terminal

@queueable
def half(i):
    if i in (2, 5):
        raise Terminal(f"{i} is refused")
    return i / 2
"""


@pytest.fixture
def tq():
    return TaskQueue("mem://jobs-test-" + __import__("uuid").uuid4().hex)


def test_the_job_record_keeps_its_wire_keys_and_state_strings():
    record = new_job_record("abc", None, "x = 1")
    assert set(record) == {"id", "name", "created", "total", "state", "error", "source", "producer"}
    assert record["state"] == "inserting" and record["name"] == "abc"
    assert [s.value for s in JobState] == ["inserting", "inserted", "insert_failed"]
    assert json.loads(json.dumps({"state": JobState.INSERTED})) == {"state": "inserted"}


def test_attach_reads_the_stored_record_and_refuses_an_unknown_job(tq):
    nb = notebook(NB)
    job = tq.insert((functools.partial(nb.half, i) for i in range(4)), name="halves", progress=False)
    again = Job.attach(tq, job.id)
    assert (again.name, again.total, again.state) == ("halves", 4, JobState.INSERTED)
    with pytest.raises(KeyError, match="no job 'nope'"):
        Job.attach(tq, "nope")


def test_total_is_unknown_while_inserting_and_the_queued_count_once_the_producer_is_gone(tq):
    record = new_job_record("live", "live", None)
    save_job_record(tq, "live", record)
    assert Job.attach(tq, "live").total is None  # this process is the producer, and alive
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record["producer"]["pid"] = int(dead.stdout)
    save_job_record(tq, "live", record)
    assert Job.attach(tq, "live").total == 0  # a producer that died: what it queued is the total


def test_an_unknown_state_reads_as_inserted(tq):
    save_job_record(tq, "odd", {**new_job_record("odd", None, None), "state": "from-the-future", "total": 0})
    assert Job.attach(tq, "odd").state is JobState.INSERTED


def test_snapshot_counts_rate_and_the_newest_error_of_this_job_only(tq):
    nb = notebook(NB)
    other = tq.insert([functools.partial(nb.half, 5)], progress=False)
    job = tq.insert((functools.partial(nb.half, i) for i in range(4)), progress=False)
    first = job.snapshot()
    assert (first.total, first.finished, first.rate, first.error) == (4, False, None, None)
    tq.poll(burst=True)
    snap = job.snapshot()
    assert snap.finished and snap.counts.completed == 3 and snap.counts.dead == 1
    assert snap.rate is not None and snap.rate > 0  # a finished job's average rate
    assert snap.error is not None and snap.error.task_id == f"{job.id}-2" and snap.error.type == "Terminal"
    assert other.latest_error().task_id == f"{other.id}-0"


def test_results_in_order_with_errors_and_before_the_end(tq):
    nb = notebook(NB)
    job = tq.insert((functools.partial(nb.half, i) for i in range(4)), progress=False)
    # Before the end: what is done now, PENDING for the rest; a bounded wait says how far it got.
    assert job.results(wait=False) == [PENDING] * 4
    with pytest.raises(TimeoutError, match=r"not finished after 0.2s: 0/4 done"):
        job.results(timeout=0.2)
    assert job.results(wait=False) == [PENDING] * 4
    tq.poll(burst=True)
    assert job.wait(timeout=5, progress=False) is job
    with pytest.raises(TaskFailed, match="1 of 4 tasks failed"):
        job.results()
    assert job.results(on_error="none") == [0.0, 0.5, None, 1.5]
    (error,) = job.errors()
    assert job.results(on_error="exception")[2] == error and error.message == "2 is refused"


def test_wait_times_out_with_the_counts(tq):
    nb = notebook(NB)
    job = tq.insert([functools.partial(nb.half, 1)], progress=False)
    with pytest.raises(TimeoutError, match="0/1 done · 0 dead · 0 running · 1 queued"):
        job.wait(timeout=0.2, progress=False)
