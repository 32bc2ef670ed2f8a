"""``nbqueue demo``: a real job on a temporary fq:// queue, end to end.

The workload is defined the way a notebook defines it: as source run in a ``__main__``
namespace, with a helper function and a global constant, so dill ships it by value and the
worker processes import nothing of it.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
import types

#: What a user would type into notebook cells.
NOTEBOOK_SOURCE = """
import math
import random
from nbqueue import queueable, Terminal

SAMPLES = 4000          # a notebook global the task reads

def estimate_pi(rng, n):            # a helper the task calls
    inside = 0
    for _ in range(n):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return 4.0 * inside / n

@queueable
def simulate(seed, fail_every=0):
    if fail_every and seed % fail_every == fail_every - 1:
        raise Terminal(f"seed {seed} is a planted failure")
    rng = random.Random(seed)
    return estimate_pi(rng, SAMPLES) - math.pi
"""


def notebook_namespace() -> types.ModuleType:
    """Run NOTEBOOK_SOURCE as a notebook would: in a module called ``__main__``."""
    module = types.ModuleType("__main__")
    exec(compile(NOTEBOOK_SOURCE, "<notebook>", "exec"), module.__dict__)
    return module


def run_demo(tasks: int = 3000, workers: int = 2, directory: str | None = None, fail_every: int = 0) -> int:
    """Insert ``tasks`` tasks, drain them with ``workers`` processes, print a summary."""
    from .queue import TaskQueue
    from .records import TaskError

    path = directory or os.path.join(tempfile.mkdtemp(prefix="nbqueue-demo-"), "queue")
    tq = TaskQueue(f"fq://{path}")
    nb = notebook_namespace()
    print(f"nbqueue demo: {tasks} tasks on fq://{path} with {workers} worker processes")
    t0 = time.perf_counter()
    job = tq.insert(
        (functools.partial(nb.simulate, seed, fail_every) for seed in range(tasks)), total=tasks, name="demo"
    )
    inserted = time.perf_counter() - t0
    t1 = time.perf_counter()
    pool = tq.spawn_workers(workers, burst=True)
    try:
        job.wait()
        drained = time.perf_counter() - t1
    finally:
        pool.stop()
    values = job.results(on_error="exception")
    failures = [v for v in values if isinstance(v, TaskError)]
    good = [v for v in values if not isinstance(v, TaskError)]
    counts = job.counts()
    mean_error = sum(good) / len(good) if good else float("nan")
    print(f"  tasks       {tasks}")
    print(f"  completed   {counts.completed}")
    print(
        f"  dead        {len(failures)}"
        + (f"  (first: {failures[0].type}: {failures[0].message})" if failures else "")
    )
    print(f"  insert      {tasks / inserted:,.0f} tasks/s ({inserted:.2f}s)")
    print(
        f"  drain       {tasks / drained:,.0f} tasks/s with {workers} workers ({drained:.2f}s, "
        "including worker start-up)"
    )
    print(f"  result      mean(pi estimate - pi) = {mean_error:+.5f}")
    print(f"  queue       fq://{path}  (inspect: nbqueue status fq://{path})")
    return 1 if failures and not fail_every else 0
