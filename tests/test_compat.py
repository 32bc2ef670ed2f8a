"""Queues written by an earlier nbqueue stay readable: the wire formats (envelopes, record
headers, job-record JSON and state strings, the fq:// layout, function blobs) did not change."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from nbqueue import TaskQueue

DATA = Path(__file__).parent / "data"


def test_a_queue_written_before_the_layered_house_still_reads_and_runs(tmp_path):
    with tarfile.open(DATA / "queue_before_layers.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    root = tmp_path / "queue_before_layers"
    for path in [root, *root.rglob("*")]:  # as the queue was made: private to its owner
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    tq = TaskQueue(f"fq://{root}")
    (job,) = tq.jobs()
    assert job.name == "before layers" and job.total == 8
    counts = tq.status()
    assert (counts.queued, counts.completed, counts.dead) == (3, 4, 1)
    (letter,) = tq.dead()
    assert letter.task_id == f"{job.id}-4"
    tq.poll(max_attempts=1, burst=True)  # the queued tasks run from the old function blob and envelopes
    values = job.wait(timeout=30, progress=False).results(on_error="exception")
    assert values[:4] == [100, 101, 102, 103] and values[5:] == [105, 106, 107]
    assert values[4].type == "Terminal" and values[4].message == "four is refused"
