"""Writes tests/data/queue_before_layers.tar.gz: an fq:// queue made by nbqueue as it was before the
layered-house refactor (commit 0db3cd0), so tests can prove queues written then stay readable.

Run from the repository root at that commit, then archive the directory:
    NBQUEUE_SECRET=nbqueue-test-secret python tests/data/make_old_queue.py
    (cd tests/data && tar czf queue_before_layers.tar.gz queue_before_layers && rm -r queue_before_layers)
"""

import functools
import os
import shutil
import sys

from nbqueue import TaskQueue, Terminal, queueable

OFFSET = 100


@queueable
def shifted(i):
    if i == 4:
        raise Terminal("four is refused")
    return i + OFFSET


if __name__ == "__main__":
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "queue_before_layers")
    shutil.rmtree(target, ignore_errors=True)
    tq = TaskQueue(f"fq://{target}")
    job = tq.insert((functools.partial(shifted, i) for i in range(8)), name="before layers", progress=False)
    tq.poll(max_tasks=5, max_attempts=1)
    print(job.id, tq.status(), file=sys.stderr)
