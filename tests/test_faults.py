"""Faults injected for real: a paused worker, a Redis server killed and restarted mid-run."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
import time

import pytest

from nbqueue import TaskQueue

from .helpers import notebook, soak_size, start_workers, wait_all, wait_for
from .invariants import EFFECT_SOURCE, check_invariants, read_runs
from .redis_server import RedisServer

NOTEBOOK = """
import os, time
from nbqueue import queueable

@queueable
def logged(i, log_dir, seconds=0.0):
    with open(os.path.join(log_dir, str(os.getpid())), "a") as f:
        f.write(f"{i}\\n")
    time.sleep(seconds)
    return i
"""


@pytest.fixture(scope="module")
def nb():
    return notebook(NOTEBOOK + EFFECT_SOURCE)


def executions(log_dir) -> dict[int, list[int]]:
    """index -> pids that ran it."""
    runs: dict[int, list[int]] = {}
    for f in log_dir.iterdir():
        for line in f.read_text().split():
            runs.setdefault(int(line), []).append(int(f.name))
    return runs


@pytest.mark.slow
def test_paused_worker_loses_its_task_and_its_late_result_is_refused(worker_url, nb, tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(nb.logged, 7, str(log_dir), 1.5)], progress=False)
    paused = subprocess.Popen(
        [sys.executable, "-m", "nbqueue", "worker", worker_url, "--lease", "1", "--burst", "-v"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: executions(log_dir), what="the first run to start")
    paused.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3.0)  # three leases
        (rescuer,) = start_workers(worker_url, 1, "--lease", "1", "--burst")
        assert wait_all([rescuer], timeout=60) == [0]
    finally:
        paused.send_signal(signal.SIGCONT)
    _, summary = paused.communicate(timeout=60)
    assert paused.returncode == 0
    (record,) = job.wait(timeout=10, progress=False).records()
    assert record.ok and record.worker.endswith(f":{rescuer.pid}") and record.attempt == 2
    assert sorted(executions(log_dir)[7]) == sorted([paused.pid, rescuer.pid])
    # The paused worker noticed: its lease was gone, so its result was dropped or refused.
    assert "0 completed" in summary and ("1 abandoned" in summary or "1 refused" in summary), summary
    assert tq.status().leased == 0 and tq.status().completed == 1


@pytest.mark.slow
def test_redis_killed_and_restarted_mid_run_loses_nothing(nb, tmp_path):
    server = RedisServer(tmp_path / "aof", ["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    url = server.url("restarts")
    n = 600
    try:
        tq = TaskQueue(url)
        job = tq.insert(
            (functools.partial(nb.side_effect, str(log_dir), 0.01) for _ in range(n)), progress=False
        )
        workers = start_workers(url, 2, "--lease", "5", "--burst")
        for _ in range(3):
            # Each kill lands mid-run: after new progress, with work still left.
            before = sum(map(len, read_runs(log_dir).values()))
            wait_for(lambda b=before: sum(map(len, read_runs(log_dir).values())) > b + 20, what="progress")
            assert tq.status().completed < n
            server.kill()
            time.sleep(1.0)
            server.start()
        assert wait_all(workers, timeout=120) == [0, 0]
        job.wait(timeout=60, progress=False)
        check_invariants(tq, job, log_dir)  # I1-I4: one result each, none stale, all at rest
        assert tq.status().completed == n
        tq.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_redis_restarted_without_persistence_fails_the_wait_clearly(nb, tmp_path):
    """A server restarted with no persistence comes back empty: a waiting job must say its queue's
    state vanished instead of waiting forever, and workers must go on (not crash-loop)."""
    from nbqueue import QueueStateLost

    server = RedisServer(tmp_path / "volatile")  # the fixture's default: --save "" --appendonly no
    server.start()
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    url = server.url("volatile")
    try:
        tq = TaskQueue(url)
        job = tq.insert(
            (functools.partial(nb.logged, i, str(log_dir), 0.05) for i in range(200)), progress=False
        )
        workers = start_workers(url, 2, "--lease", "2", "--burst")
        wait_for(lambda: executions(log_dir), what="the first tasks to run")
        server.kill()
        # The wait starts while the server is down: it rides out the outage, then must notice.
        restart = threading.Timer(2.0, server.start)
        restart.start()
        started = time.monotonic()
        try:
            with pytest.raises(QueueStateLost, match="state vanished.*insert the job again"):
                job.wait(timeout=60, progress=False)
        finally:
            restart.join()
        assert 2.0 < time.monotonic() - started < 12
        assert wait_all(workers, timeout=60) == [0, 0]  # they found an empty queue and stopped
        ran = sum(map(len, executions(log_dir).values()))
        assert 0 < ran < 200
        again = tq.insert((functools.partial(nb.logged, i, str(log_dir)) for i in range(3)), progress=False)
        assert wait_all(start_workers(url, 1, "--burst"), timeout=60) == [0]
        assert again.wait(timeout=30, progress=False).results() == [0, 1, 2]
        tq.close()
    finally:
        server.stop()


PURGED = """
from scipy import stats
from nbqueue import queueable

@queueable
def p_value(shift):
    return round(float(stats.ttest_1samp([shift - 1, shift, shift + 1], 0).pvalue), 6)
"""


def test_a_queue_purged_by_another_process_takes_the_next_insert(worker_url, nb, tmp_path):
    """This process read the queue's identity for its first job; another process purges the
    queue (a new identity). The next inserts are refused by the storage's fence, signed again and
    written whole (no round trip is spent checking the identity before each insert); an insert
    that the purge cuts in two raises QueueStateLost instead of leaving orphans."""
    from nbqueue import QueueStateLost

    tq = TaskQueue(worker_url)
    more = notebook(PURGED)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    workers = start_workers(worker_url, 1)
    try:
        first = tq.insert([functools.partial(nb.logged, 0, str(log_dir))], progress=False)
        assert first.wait(timeout=60, progress=False).results() == [0]
        subprocess.run(
            [sys.executable, "-m", "nbqueue", "purge", worker_url, "--yes"], check=True, capture_output=True
        )
        assert tq.queue_id != first.queue_id
        # One batch from a generator (read once), with two functions the new identity lacks.
        tasks = (
            functools.partial(nb.logged, 1, str(log_dir)) if i == 0 else functools.partial(more.p_value, 2.0)
            for i in range(2)
        )
        job = tq.insert(tasks, progress=False)
        assert job.queue_id == tq.queue_id
        assert job.wait(timeout=60, progress=False).results() == [1, more.p_value(2.0)]

        other = TaskQueue(worker_url)

        def purged_midway():
            for i in range(5):
                if i == 3:
                    other.purge()  # the job's first batch (3 tasks) is written, its second is not
                yield functools.partial(more.p_value, float(i))

        with pytest.raises(QueueStateLost, match="identity changed") as caught:
            tq.insert(purged_midway(), batch_size=3, progress=False)
        assert "3 task(s) of job" in "".join(getattr(caught.value, "__notes__", []))
        assert tq.status().queued == 0  # nothing signed for the old identity landed in the new one
        other.close()
        again = tq.insert([functools.partial(more.p_value, 1.0)], progress=False)
        assert again.wait(timeout=60, progress=False).results() == [more.p_value(1.0)]
    finally:
        for proc in workers:
            proc.terminate()
        wait_all(workers, timeout=60)
        tq.close()


GIL = """
import os
from nbqueue import queueable

@queueable
def hog(i, log_dir, n):
    with open(os.path.join(log_dir, str(os.getpid())), "a") as f:
        f.write(f"{i}\\n")
    # sum() over a range runs in C without releasing the GIL: no thread of this process runs.
    return sum(range(n)) + i
"""


def _gil_loop_size(seconds: float) -> int:
    start = time.perf_counter()
    sum(range(5_000_000))
    return int(5_000_000 * seconds / (time.perf_counter() - start))


@pytest.mark.slow
@pytest.mark.parametrize("renewal", ["process", "thread"])
def test_tasks_holding_the_gil_past_their_lease(worker_url, tmp_path, renewal):
    """With the keeper process (the default) a task holding the GIL for ~8 leases keeps its lease:
    no duplicates. Renewing from a thread (the old way) shows why: the lease is lost."""
    gnb = notebook(GIL)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    n = _gil_loop_size(2.4)  # ~8 leases of 0.3 s
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(gnb.hog, i, str(log_dir), n) for i in range(2)], progress=False)
    # Three workers for two tasks: each busy one leases one task (slow start), so the third is
    # idle when a lease lapses, and takes the task if its lease was not kept.
    workers = start_workers(
        worker_url, 3, "--lease", "0.3", "--burst", "--renew", renewal, "--max-attempts", "5"
    )
    assert wait_all(workers, timeout=120) == [0, 0, 0]
    job.wait(timeout=30, progress=False)
    runs = executions(log_dir)
    duplicates = sum(len(pids) - 1 for pids in runs.values())
    if renewal == "process":
        assert duplicates == 0, runs
        assert [r.attempt for r in job.records()] == [1, 1]
        assert job.results() == [n * (n - 1) // 2, n * (n - 1) // 2 + 1]
    else:
        assert duplicates > 0, "the GIL-holding task should have lost its lease to the other worker"


POISONS = """
import ctypes, os
from nbqueue import queueable

@queueable
def good(i):
    return i

@queueable
def raises(i):
    raise ValueError(f"bad input {i}")

@queueable
def exits(i):
    os._exit(1)

@queueable
def segfaults(i):
    ctypes.string_at(0)

@queueable
def memory_bomb(i):
    return len(bytearray(8 * 1024**3))  # far past the workers' address-space limit
"""


@pytest.mark.slow
@pytest.mark.soak_timeout(600)
def test_every_kind_of_poison_is_dead_lettered_and_every_good_task_completes(
    worker_url, tmp_path, request, monkeypatch
):
    pnb = notebook(POISONS)
    # A function from a module this process imports and declares installed on the workers
    # (NBQUEUE_BY_REFERENCE), which they lack: it travels by reference, so a worker fails to
    # decode it (terminal: dead at once, never retried).
    monkeypatch.setenv("NBQUEUE_BY_REFERENCE", "producer_only")
    monkeypatch.setattr("nbqueue.pickling._installed_cache", {})
    private = tmp_path / "private_mod"
    private.mkdir()
    (private / "producer_only.py").write_text(
        "from nbqueue import queueable\n\n@queueable\ndef helper(i):\n    return i\n"
    )
    sys.path.insert(0, str(private))
    try:
        import producer_only
    finally:
        sys.path.remove(str(private))
    n, attempts = soak_size(request, 300, 1000), 2
    tasks = [functools.partial(pnb.good, i) for i in range(n)]
    poisons = {
        7: pnb.raises,
        50: pnb.exits,
        120: pnb.segfaults,
        200: pnb.memory_bomb,
        260: producer_only.helper,
    }
    for index, fn in poisons.items():
        tasks[index] = functools.partial(fn, index)
    job = TaskQueue(worker_url).insert(tasks, progress=False)

    def limit_memory():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 * 1024**3, 4 * 1024**3))

    cmd = ["worker", worker_url, "-p", "2", "--lease", "1", "--max-attempts", str(attempts), "--burst"]
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "nbqueue", *cmd], stdin=subprocess.DEVNULL, preexec_fn=limit_memory
    )
    assert wait_all([supervisor], timeout=180) == [0]
    values = job.wait(timeout=30, progress=False).results(on_error="exception")
    assert [v for i, v in enumerate(values) if i not in poisons] == [i for i in range(n) if i not in poisons]
    kinds = {i: (values[i].type, values[i].attempts) for i in poisons}
    assert kinds[7] == ("ValueError", attempts)
    assert kinds[200] == ("MemoryError", attempts)
    assert kinds[50][0] == kinds[120][0] == "WorkerDied"
    for i in (50, 120):  # not run a third time: dead-lettered unrun after its attempts ran out
        assert f"{attempts} attempt(s) ended without a result" in values[i].message
    assert kinds[260] == ("DecodeError", 1)  # terminal: not retried
    assert "producer_only" in values[260].message
    assert sorted(d.task_id for d in TaskQueue(worker_url).dead()) == sorted(f"{job.id}-{i}" for i in poisons)
    c = TaskQueue(worker_url).status()
    assert (c.queued, c.leased) == (0, 0)
