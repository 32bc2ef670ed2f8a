"""nbqueue benchmarks: insert and drain rates, round trips, memory, beside the peers.

    python benchmarks/run.py            # full sizes (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # tiny sizes: proves the scripts work (CI)
    python benchmarks/run.py --only roundtrip,rss

Prints a table and one JSON line per figure. Peers run when installed (``pip install -e
'.[bench]'``): python-task-queue for fq://, raw redis-py pipelined LPUSH of the same payload bytes
for redis://, and for round trips huey and RQ, each with its own worker process. Redis figures
start a private redis-server on a free loopback port; each system uses its own database there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nbqueue  # noqa: E402
from nbqueue import TaskQueue  # noqa: E402
from tests.helpers import notebook  # noqa: E402

NOTEBOOK = """
import asyncio
from nbqueue import queueable
import numpy as np

@queueable
def noop(i):
    return i

@queueable
async def wait_for_io(i, seconds):
    await asyncio.sleep(seconds)
    return i

class NoopTasks:
    # A python-task-queue-style task iterator: len() and slices, built lazily.
    def __init__(self, start, stop):
        self.start, self.stop = start, stop
    def __len__(self):
        return self.stop - self.start
    def __getitem__(self, part):
        lo, hi, _ = part.indices(len(self))
        return NoopTasks(self.start + lo, self.start + hi)
    def __iter__(self):
        from functools import partial
        return (partial(noop, i) for i in range(self.start, self.stop))

def closure_over(nbytes):
    data = np.zeros(nbytes // 8)
    @queueable
    def big(i):
        return i + data.size
    return big
"""

#: Notebook code as a data scientist writes it: from-imported library functions called from
#: notebook helpers, globals, closures, a notebook class. Compiled under a cell file name with
#: its source in linecache, as IPython does, so the shipped bytes include the cell's lines.
SHIP_NOTEBOOK = """
import dataclasses
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.datasets import make_classification
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import cross_val_score
from nbqueue import queueable

X, y = make_classification(n_samples=50, n_features=4, random_state=0)
FRAME = pd.DataFrame({"g": [0, 1], "v": [1.0, 2.0]})

def fit_eval(C):
    return cross_val_score(LogisticRegression(C=C), X, y, cv=3).mean()

@queueable
def cv_score(C):
    return fit_eval(C)

@queueable
def f1(C):
    model = LogisticRegression(C=C).fit(X, y)
    return f1_score(y, model.predict(X)), roc_auc_score(y, model.predict_proba(X)[:, 1])

@queueable
def synthetic(n):
    return make_classification(n_samples=n)[0].shape

@queueable
def importance():
    return permutation_importance(LogisticRegression().fit(X, y), X, y, n_repeats=2).importances_mean

@queueable
def ttest(shift):
    return stats.ttest_ind(X[:, 0], X[:, 0] + shift).pvalue

def mean_by(column):
    return lambda frame: frame.groupby(column)["v"].mean()

@queueable
def grouped(column):
    return mean_by(column)(FRAME)

@dataclasses.dataclass
class Params:
    C: float

    def scaled(self, k):
        return self.C * k

@queueable
def with_params(p, k):
    return p.scaled(k) if isinstance(p, Params) else None
"""
SHIP_FUNCTIONS = ["cv_score", "f1", "synthetic", "importance", "ttest", "grouped", "with_params"]

FULL = {
    "insert": 100_000,
    "drain": 20_000,
    "roundtrip": 40,
    "rss": 1_000_000,
    "closure": 10_000,
    "ship": 20,
    "async": 1_000,
}
QUICK = {
    "insert": 2_000,
    "drain": 1_000,
    "roundtrip": 5,
    "rss": 20_000,
    "closure": 200,
    "ship": 2,
    "async": 100,
}

ROWS: list[dict] = []


def report(
    figure: str,
    value: float,
    unit: str,
    peer: float | None = None,
    peer_name: str = "",
    note: str = "",
    **extra: object,
) -> None:
    row: dict[str, object] = {"figure": figure, "value": round(value, 2), "unit": unit, **extra}
    if peer is not None:
        row.update(peer=peer_name, peer_value=round(peer, 2), ratio=round(value / peer, 2) if peer else None)
    if note:
        row["note"] = note
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fresh_dir() -> str:
    return tempfile.mkdtemp(prefix="nbqueue-bench-")


def has_ptq() -> bool:
    try:
        import taskqueue  # noqa: F401
    except ImportError:
        return False
    return True


# -- python-task-queue (peer) ---------------------------------------------------------------------
def ptq_insert_rate(n: int) -> float:
    from taskqueue import TaskQueue as PTQ

    from benchmarks.ptq_tasks import noop

    tq = PTQ(f"fq://{fresh_dir()}/ptq")
    seconds = timed(lambda: tq.insert((functools.partial(noop, i) for i in range(n)), total=n))
    return n / seconds


def ptq_poll_rate(n: int) -> float:
    from taskqueue import TaskQueue as PTQ

    from benchmarks.ptq_tasks import noop

    tq = PTQ(f"fq://{fresh_dir()}/ptq")
    tq.insert((functools.partial(noop, i) for i in range(n)), total=n)
    seconds = timed(lambda: tq.poll(lease_seconds=600, stop_fn=lambda executed: executed >= n))
    return n / seconds


# -- figures --------------------------------------------------------------------------------------
def bench_insert(nb, sizes, redis_server) -> None:
    n = sizes["insert"]

    def insert_rate(url: str) -> float:
        tq = TaskQueue(url)
        return n / timed(
            lambda: tq.insert((functools.partial(nb.noop, i) for i in range(n)), total=n, progress=False)
        )

    peer = ptq_insert_rate(n) if has_ptq() else None
    report("insert_fq", insert_rate(f"fq://{fresh_dir()}/q"), "tasks/s", peer, "python-task-queue fq")
    one = n / timed(lambda: TaskQueue(f"fq://{fresh_dir()}/q").insert(nb.NoopTasks(0, n), progress=False))
    two = n / timed(
        lambda: TaskQueue(f"fq://{fresh_dir()}/q").insert(nb.NoopTasks(0, n), parallel=2, progress=False)
    )
    report(
        "insert_fq_parallel_2",
        two,
        "tasks/s",
        one,
        "nbqueue parallel=1",
        note="a sliceable task iterator; includes starting 2 processes",
    )
    report("insert_mem", insert_rate(f"mem://bench-{os.getpid()}-{time.time_ns()}"), "tasks/s")
    if redis_server is not None:
        url = redis_server.url(f"bench{time.time_ns()}")
        rate = insert_rate(url)
        raw = raw_lpush_rate(redis_server, url, n)
        report(
            "insert_redis",
            rate,
            "tasks/s",
            raw,
            "raw redis-py LPUSH",
            note="raw LPUSH pushes bytes made beforehand; nbqueue also builds, pickles and signs each task",
        )
        url2 = redis_server.url(f"bench{time.time_ns()}")
        two = n / timed(lambda: TaskQueue(url2).insert(nb.NoopTasks(0, n), parallel=2, progress=False))
        report("insert_redis_parallel_2", two, "tasks/s", raw, "raw redis-py LPUSH")


def raw_lpush_rate(redis_server, url: str, n: int) -> float:
    """Pipelined LPUSH of the same payload bytes nbqueue queued, in batches of the same size."""
    from nbqueue import defaults

    tq = TaskQueue(url)
    payloads = [payload for _, payload in tq.backend.iter_queued()][:n]
    client = redis_server.client()
    batch = defaults.INSERT_BATCH_SIZE

    def push() -> None:
        for start in range(0, len(payloads), batch):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[start : start + batch]:
                pipe.lpush("raw-bench", payload)
            pipe.execute()

    seconds = timed(push)
    client.delete("raw-bench")
    client.close()
    return len(payloads) / seconds


def drain_with_processes(nb, url: str, n: int, workers: int, jobs: int = 1) -> float:
    """Tasks/s of ``workers`` processes draining ``n`` trivial tasks in ``jobs`` jobs (which the
    workers serve in turn)."""
    tq = TaskQueue(url)
    each = n // jobs
    inserted = [
        tq.insert((functools.partial(nb.noop, i) for i in range(each)), total=each, progress=False)
        for _ in range(jobs)
    ]
    start = time.perf_counter()
    pool = tq.spawn_workers(workers, burst=True, idle_exit=None)  # the URL travels out of sight of ps
    for job in inserted:
        job.wait(progress=False)
    seconds = time.perf_counter() - start
    n = each * jobs
    pool.wait()
    return n / seconds


def bench_drain(nb, sizes, redis_server) -> None:
    n = sizes["drain"]
    tq = TaskQueue(f"fq://{fresh_dir()}/q")
    tq.insert((functools.partial(nb.noop, i) for i in range(n)), total=n, progress=False)
    in_process = n / timed(lambda: tq.poll(burst=True))
    peer = ptq_poll_rate(n) if has_ptq() else None
    report("drain_fq_in_process", in_process, "tasks/s", peer, "python-task-queue poll")
    for workers in (1, 2):
        report(
            f"drain_fq_{workers}_workers",
            drain_with_processes(nb, f"fq://{fresh_dir()}/q", n, workers),
            "tasks/s",
            note="includes worker start-up",
        )
    report(
        "drain_fq_100_jobs_2_workers",
        drain_with_processes(nb, f"fq://{fresh_dir()}/q", n, 2, jobs=100),
        "tasks/s",
        note="the same tasks in 100 jobs, served in turn",
    )
    if redis_server is not None:
        for workers in (1, 2):
            url = redis_server.url(f"bench{time.time_ns()}")
            report(
                f"drain_redis_{workers}_workers",
                drain_with_processes(nb, url, n, workers),
                "tasks/s",
                note="includes worker start-up",
            )
        report(
            "drain_redis_100_jobs_2_workers",
            drain_with_processes(nb, redis_server.url(f"bench{time.time_ns()}"), n, 2, jobs=100),
            "tasks/s",
            note="the same tasks in 100 jobs, served in turn",
        )


# -- round trips ----------------------------------------------------------------------------------
#: Seconds between round trips: the worker is idle when the next call comes, as a user's next
#: cell would find it (a polling worker has backed off to its longest interval by then).
ROUNDTRIP_GAP = 0.3
#: Untimed calls first: the worker's start-up, imports and connections.
ROUNDTRIP_WARMUP = 2
#: Seconds any one call may take (the first waits for the worker to start).
ROUNDTRIP_TIMEOUT = 60
RQ_QUEUE = "nbqueue-bench"
URL_ENV_HUEY = "NBQUEUE_BENCH_HUEY_URL"  # benchmarks/huey_tasks.py reads it
#: The private redis-server's databases: each system its own.
NBQUEUE_DB, HUEY_DB, RQ_DB = 0, 1, 2

#: (system, call, n, median ms, p90 ms) for the side-by-side table.
ROUNDTRIPS: list[tuple[str, str, int, float, float]] = []


def percentile(times: list[float], q: float) -> float:
    """Nearest-rank percentile of ``times``."""
    ordered = sorted(times)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def time_round_trips(call: Callable[[int], object], n: int) -> list[float]:
    """Seconds of ``n`` calls ``call(i)``, each of which must return ``i``, after a warm-up."""
    for i in range(ROUNDTRIP_WARMUP):
        check_value(call(-1 - i), -1 - i)
    times = []
    for i in range(n):
        time.sleep(ROUNDTRIP_GAP)
        start = time.perf_counter()
        value = call(i)
        times.append(time.perf_counter() - start)
        check_value(value, i)
    return times


def check_value(value: object, expected: int) -> None:
    if value != expected:
        raise RuntimeError(f"round trip returned {value!r}, expected {expected!r}")


def report_round_trips(key: str, system: str, call: str, times: list[float], note: str = "") -> None:
    median, p90 = statistics.median(times) * 1000, percentile(times, 0.9) * 1000
    ROUNDTRIPS.append((system, call, len(times), median, p90))
    extra = {"system": system, "call": call, "n": len(times)}
    report(f"roundtrip_{key}_median", median, "ms", note=note, **extra)
    report(f"roundtrip_{key}_p90", p90, "ms", note=note, **extra)


def log_tail(path: Path, lines: int = 10) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def peer_process(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A peer's worker process for the block, its output in ``log``; stopped on leaving, even on an
    error. Its own session, so that anything it forked is stopped with it."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    except Exception as e:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: {e}; its log ends:\n{log_tail(log)}") from e
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its session: the worker and anything it forked
        if proc.poll() is None:
            proc.wait()


def peer_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable (for benchmarks.huey_tasks, say)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def nbqueue_round_trips(nb, url: str, kind: str, n: int) -> None:
    """One idle worker; ``fn.submit(x).get()`` and ``insert([...]).wait()`` + ``results()``."""
    tq = nbqueue.use(url)
    pool = tq.spawn_workers(1, idle_exit=None)
    try:

        def submit(x: int) -> object:
            return nb.noop.submit(x).get(timeout=ROUNDTRIP_TIMEOUT)

        def insert(x: int) -> object:
            job = tq.insert([functools.partial(nb.noop, x)], progress=False)
            job.wait(timeout=ROUNDTRIP_TIMEOUT, progress=False)
            return job.results()[0]

        system = f"nbqueue {kind}://"
        report_round_trips(f"{kind}_submit", system, "fn.submit(x).get()", time_round_trips(submit, n))
        report_round_trips(
            f"{kind}_insert", system, "insert([task]).wait(); results()", time_round_trips(insert, n)
        )
    finally:
        pool.stop()


def huey_round_trips(redis_server, n: int) -> None:
    """huey's ``RedisHuey`` (configured in benchmarks/huey_tasks.py), its consumer a real
    ``huey_consumer`` process with one worker thread: ``task(x).get(blocking=True)``."""
    url = f"redis://127.0.0.1:{redis_server.port}/{HUEY_DB}"
    os.environ[URL_ENV_HUEY] = url  # read when benchmarks.huey_tasks is imported, here and there
    import huey

    from benchmarks import huey_tasks

    # -w 1 -k thread: one worker thread, the consumer's defaults spelled out. -d/-m/-b (polling
    # delays) are left alone: with blocking=True the consumer waits in BRPOP and never sleeps.
    cmd = [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks.huey_tasks.huey"]
    cmd += ["-w", "1", "-k", "thread"]
    log = Path(fresh_dir()) / "huey_consumer.log"
    with peer_process(cmd, log, peer_env(**{URL_ENV_HUEY: url})):

        def call(x: int) -> object:
            return huey_tasks.noop(x).get(blocking=True, timeout=ROUNDTRIP_TIMEOUT)

        storage = huey_tasks.huey.storage
        notify = bool(getattr(storage, "notify_result", False))
        system = f"huey {huey.__version__}"
        report_round_trips(
            "huey",
            system,
            "task(x).get(blocking=True)" + (", notify_result" if notify else ""),
            time_round_trips(call, n),
            note="RedisHuey(blocking=True, notify_result=True): BRPOP for work, BLPOP for the result"
            if notify
            else "RedisHuey(blocking=True): BRPOP for work; the result polled from 50 ms",
        )
        if notify:
            # The same consumer; this process waits as huey does by default (notify_result=False):
            # it polls the result hash after 50 ms, 57.5 ms, ... (backoff 1.15).
            storage.notify_result = False
            try:
                times = time_round_trips(call, n)
            finally:
                storage.notify_result = True
            report_round_trips(
                "huey_polling",
                system,
                "task(x).get(blocking=True), result polled",
                times,
                note="huey's default notify_result=False: the result polled from 50 ms",
            )


def rq_round_trips(redis_server, n: int) -> None:
    """RQ: a real ``rq worker`` process of the default worker class (``rq.Worker``, which forks a
    work horse per job), ``q.enqueue(fn, x)`` then ``job.latest_result(timeout=...)``."""
    import inspect

    import rq
    from redis import Redis
    from rq import Queue

    from benchmarks import rq_tasks

    url = f"redis://127.0.0.1:{redis_server.port}/{RQ_DB}"
    cmd = [sys.executable, "-m", "rq.cli", "worker", "--url", url, "--path", str(ROOT)]
    cmd += ["--name", f"nbqueue-bench-{os.getpid()}", RQ_QUEUE]
    blocking = "timeout" in inspect.signature(rq.job.Job.latest_result).parameters
    connection = Redis.from_url(url)
    log = Path(fresh_dir()) / "rq_worker.log"
    try:
        with peer_process(cmd, log, peer_env()):
            q = Queue(RQ_QUEUE, connection=connection)

            def call(x: int) -> object:
                job = q.enqueue(rq_tasks.noop, x)
                if blocking:  # rq >= 1.15: XREAD BLOCK on the job's result stream
                    result = job.latest_result(timeout=ROUNDTRIP_TIMEOUT)
                else:  # older rq: poll, as its docs' examples do
                    deadline = time.monotonic() + ROUNDTRIP_TIMEOUT
                    while (result := job.latest_result()) is None and time.monotonic() < deadline:
                        time.sleep(0.005)
                if result is None:
                    raise TimeoutError(f"rq job {job.id} not finished after {ROUNDTRIP_TIMEOUT} s")
                if result.type != result.Type.SUCCESSFUL:
                    raise RuntimeError(f"rq job {job.id}: {result.type}: {result.exc_string}")
                return result.return_value

            report_round_trips(
                "rq",
                f"rq {rq.__version__}",
                "q.enqueue(fn, x).latest_result(timeout=)" if blocking else "q.enqueue(fn, x), result polled",
                time_round_trips(call, n),
                note="default rq.Worker: forks a work horse per job",
            )
    finally:
        connection.close()


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def bench_roundtrip(nb, sizes, redis_server) -> None:
    """Submit one task to one idle worker and wait for its value, through each system's public
    API: what a user feels between running a cell and seeing its result."""
    n = sizes["roundtrip"]
    nbqueue_round_trips(nb, f"fq://{fresh_dir()}/q", "fq", n)
    if redis_server is None:
        print("roundtrip: redis:// figures, huey and rq skipped: no redis-server (or --no-redis)")
        return
    nbqueue_round_trips(nb, redis_server.url(f"bench{time.time_ns()}", db=NBQUEUE_DB), "redis", n)
    for name, run in (("huey", huey_round_trips), ("rq", rq_round_trips)):
        if importable(name):
            run(redis_server, n)
        else:
            print(f"roundtrip: {name} skipped: not installed (pip install -e '.[bench]')", flush=True)


def print_round_trips() -> None:
    if not ROUNDTRIPS:
        return
    print()
    print("round trip: one task to one idle worker, through each system's public API")
    print(f"{'system':<18}{'call':<52}{'n':>4}{'median ms':>11}{'p90 ms':>9}")
    for system, call, n, median, p90 in ROUNDTRIPS:
        print(f"{system:<18}{call:<52}{n:>4}{median:>11.1f}{p90:>9.1f}")


RSS_CHILD = """
import functools, resource, sys
sys.path.insert(0, sys.argv[3])
which, n, root = sys.argv[1], int(sys.argv[2]), sys.argv[4]
if which == "nbqueue":
    from nbqueue import TaskQueue
    from tests.helpers import notebook
    nb = notebook("from nbqueue import queueable\\n@queueable\\ndef noop(i):\\n    return i\\n")
    tasks = (functools.partial(nb.noop, i) for i in range(n))
    TaskQueue(f"fq://{root}/q").insert(tasks, total=n, progress=False)
else:
    from taskqueue import TaskQueue
    from benchmarks.ptq_tasks import noop
    TaskQueue(f"fq://{root}/q").insert((functools.partial(noop, i) for i in range(n)), total=n)
# ru_maxrss survives fork+exec on Linux (it would report the parent's peak): VmHWM does not.
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) / 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mb(which: str, n: int) -> float:
    root = fresh_dir()
    try:
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, which, str(n), str(ROOT), root],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "NBQUEUE_PROGRESS": "off"},
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_rss(nb, sizes, redis_server) -> None:
    n = sizes["rss"]
    # The peer inserts ~1k tasks/s here, so it is compared at 200k tasks (20 minutes at 1M).
    compared = min(n, 200_000)
    peer = peak_rss_mb("ptq", compared) if has_ptq() else None
    report(f"peak_rss_insert_{compared}", peak_rss_mb("nbqueue", compared), "MB", peer, "python-task-queue")
    if n > compared:
        report(f"peak_rss_insert_{n}", peak_rss_mb("nbqueue", n), "MB")


def bench_closure(nb, sizes, redis_server) -> None:
    n = sizes["closure"]
    big = nb.closure_over(10 * 1024 * 1024)

    def rate(fn) -> float:
        tq = TaskQueue(f"fq://{fresh_dir()}/q")
        return n / timed(
            lambda: tq.insert((functools.partial(fn, i) for i in range(n)), total=n, progress=False)
        )

    tiny, large = rate(nb.noop), rate(big)
    report(
        "insert_10MB_closure",
        large,
        "tasks/s",
        tiny,
        "tiny function",
        note="ratio = closure rate / tiny rate; the blob is stored once per job",
    )


def cloudpickle_module():
    """cloudpickle, the measuring stick for shipped bytes (scikit-learn's joblib vendors it)."""
    try:
        import cloudpickle
    except ImportError:
        try:
            from joblib.externals import cloudpickle
        except ImportError:
            return None
    return cloudpickle


def bench_ship(nb, sizes, redis_server) -> None:
    """Serializing notebook functions that call scikit-learn, scipy and pandas: the time
    ``nbqueue.explain`` (the same dill pickler an insert uses) takes and the bytes it ships,
    beside cloudpickle's bytes. ``dill.dumps(recurse=True)`` took 12.8 s or hit RecursionError."""
    import linecache
    import types

    import nbqueue

    filename = "/tmp/ipykernel_0/benchmark_cell.py"
    linecache.cache[filename] = (len(SHIP_NOTEBOOK), None, SHIP_NOTEBOOK.splitlines(True), filename)
    cell = types.ModuleType("__main__")
    exec(compile(SHIP_NOTEBOOK, filename, "exec"), cell.__dict__)
    cloudpickle = cloudpickle_module()
    slowest, ours, theirs = 0.0, 0, 0
    for name in SHIP_FUNCTIONS:
        fn = getattr(cell, name)
        best = min(nbqueue.explain(fn).seconds for _ in range(sizes["ship"]))
        slowest = max(slowest, best)
        ours += nbqueue.explain(fn).nbytes
        if cloudpickle is not None:
            theirs += len(cloudpickle.dumps(fn))
    report(
        "ship_slowest_function",
        slowest * 1000,
        "ms",
        note=f"slowest of {len(SHIP_FUNCTIONS)} notebook functions",
    )
    report(
        "ship_bytes_all_functions",
        ours,
        "bytes",
        theirs or None,
        "cloudpickle" if theirs else "",
        note="nbqueue's bytes include the cells' source lines, for tracebacks",
    )


def bench_async(nb, sizes, redis_server) -> None:
    """``async def`` tasks of 0.1 s of awaiting, one worker process at --concurrency 100 (one at
    a time they would take n / 10 seconds), worker start-up excluded."""
    n = sizes["async"]
    url = f"fq://{fresh_dir()}/q"
    tq = TaskQueue(url)
    pool = tq.spawn_workers(1, concurrency=100, idle_exit=None)
    try:
        tq.insert([functools.partial(nb.wait_for_io, -1, 0.0)], progress=False).wait(progress=False)
        start = time.perf_counter()
        job = tq.insert((functools.partial(nb.wait_for_io, i, 0.1) for i in range(n)), progress=False)
        job.wait(progress=False)
        seconds = time.perf_counter() - start
    finally:
        pool.stop()
    report(
        "async_fq_concurrency_100",
        seconds,
        "s",
        note=f"{n} tasks awaiting 0.1 s; one at a time: {n / 10:g} s",
    )


FIGURES = {
    "ship": bench_ship,
    "insert": bench_insert,
    "drain": bench_drain,
    "roundtrip": bench_roundtrip,
    "rss": bench_rss,
    "closure": bench_closure,
    "async": bench_async,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the scripts run")
    parser.add_argument("--only", default="", help="comma-separated figure groups: " + ",".join(FIGURES))
    parser.add_argument("--no-redis", action="store_true", help="skip redis:// figures")
    args = parser.parse_args()
    os.environ.setdefault("NBQUEUE_PROGRESS", "off")
    # A SIGTERM (CI's timeout, say) unwinds like Ctrl-C: every worker and server started here stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sizes = QUICK if args.quick else FULL
    chosen = [name for name in (args.only.split(",") if args.only else FIGURES) if name]
    unknown = set(chosen) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figure group(s): {', '.join(sorted(unknown))}")
    nb = notebook(NOTEBOOK)
    redis_server = None
    if not args.no_redis and shutil.which("redis-server"):
        from tests.redis_server import RedisServer

        redis_server = RedisServer(Path(fresh_dir()))
        redis_server.start()
    try:
        for name in chosen:
            FIGURES[name](nb, sizes, redis_server)
    finally:
        if redis_server is not None:
            redis_server.stop()
    print()
    print(f"{'figure':<32}{'nbqueue':>14}  {'unit':<8}{'peer':>14}  {'ratio':>7}  peer")
    for row in ROWS:
        peer = f"{row['peer_value']:>14,.1f}" if "peer_value" in row else " " * 14
        ratio = f"{row['ratio']:>7.2f}" if row.get("ratio") is not None else " " * 7
        name, value, unit = row["figure"], row["value"], row["unit"]
        print(f"{name:<32}{value:>14,.1f}  {unit:<8}{peer}  {ratio}  {row.get('peer', '')}")
    print_round_trips()
    return 0


if __name__ == "__main__":
    sys.exit(main())
