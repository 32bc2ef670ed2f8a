"""Read-only reports: queue status, one job, one task, dead letters — never unpickling a task."""

from __future__ import annotations

import functools
import uuid

import pytest

from nbqueue import TaskQueue
from nbqueue.report import dead_letter_line, dead_letters, inspect_task, job_report, queue_status

from .helpers import CANARY_SOURCE, notebook

NB = (
    CANARY_SOURCE
    + """
from nbqueue import queueable, Terminal

@queueable
def check(i, canary=None):
    if i % 3 == 2:
        raise Terminal(f"{i} is refused")
    return i
"""
)


@pytest.fixture
def tq():
    return TaskQueue(f"mem://report-{uuid.uuid4().hex}")


def test_queue_status_has_counts_head_age_leases_and_workers(tq):
    nb = notebook(NB)
    tq.insert((functools.partial(nb.check, i) for i in range(3)), progress=False)
    status = queue_status(tq)
    assert (status["inserted"], status["queued"], status["leased"]) == (3, 3, 0)
    assert status["oldest_queued_age"] is not None and 0 <= status["oldest_queued_age"] < 60
    assert status["leases_expiring"] == [] and status["workers"] == []
    leases = tq.backend.lease(1, 30)
    assert [row["task_id"] for row in queue_status(tq)["leases_expiring"]] == [leases[0].task_id]


def test_job_report_has_counts_timings_and_errors(tq):
    nb = notebook(NB)
    job = tq.insert((functools.partial(nb.check, i) for i in range(6)), name="six", progress=False)
    tq.poll(burst=True)
    report = job_report(tq, job.id)
    assert (report["name"], report["state"], report["total"], report["completed"], report["dead"]) == (
        "six",
        "inserted",
        6,
        4,
        2,
    )
    assert report["first_started"] <= report["last_finished"]
    assert [(e["task_id"], e["type"]) for e in report["errors"]] == [
        (f"{job.id}-2", "Terminal"),
        (f"{job.id}-5", "Terminal"),
    ]
    with pytest.raises(KeyError):
        job_report(tq, "nope")


def test_inspect_reads_a_task_without_loading_it(tmp_path, tq):
    nb = notebook(NB)
    canary = tmp_path / "canary"
    job = tq.insert([functools.partial(nb.check, 0, nb.Canary(str(canary)))], progress=False)
    task = inspect_task(tq, f"{job.id}-0")
    assert task["state"] == "queued" and task["payload"]["signature"] == "ok"
    assert task["payload"]["kind"] == "pickled arguments" and task["payload"]["function"].startswith(
        "digest "
    )
    assert not canary.exists()  # nothing was unpickled
    with pytest.raises(KeyError):
        inspect_task(tq, f"{job.id}-9")


def test_dead_letters_newest_first_of_one_job_and_their_lines(tq):
    nb = notebook(NB)
    first = tq.insert((functools.partial(nb.check, i) for i in range(3)), progress=False)
    tq.poll(burst=True)
    second = tq.insert((functools.partial(nb.check, i) for i in range(6)), progress=False)
    tq.poll(burst=True)
    rows = dead_letters(tq)
    assert [r["task_id"] for r in rows][:2] == [f"{second.id}-5", f"{second.id}-2"]
    assert [r["task_id"] for r in dead_letters(tq, first.id)] == [f"{first.id}-2"]
    (newest,) = dead_letters(tq, limit=1)
    assert newest["type"] == "Terminal" and newest["message"] == "5 is refused" and newest["attempts"] == 1
    assert dead_letter_line(newest) == f"{second.id}-5  attempts=1  Terminal: 5 is refused"
