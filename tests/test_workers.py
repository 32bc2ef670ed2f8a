"""Real worker processes: exactly-once audit, kills, retries, dead letters, tampering."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nbqueue import LocalTaskQueue, TaskFailed, TaskQueue

from .helpers import CANARY_SOURCE, notebook, start_workers, wait_all, wait_for

NOTEBOOK = """
import os, time
from nbqueue import queueable, Terminal

@queueable
def double(i):
    return 2 * i

@queueable
def record(i, log_dir):
    # One line per execution, in a file per worker process: duplicates would show.
    with open(os.path.join(log_dir, str(os.getpid())), "a") as f:
        f.write(f"{i}\\n")
    return i * 2

@queueable
def slow(seconds, marker):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(seconds)
    return os.getpid()

@queueable
def flaky(flag_path):
    if not os.path.exists(flag_path):
        raise ValueError(f"no flag at {flag_path}")
    return "fixed"

@queueable
def refuse():
    raise Terminal("this input can never work")

@queueable
def touch(obj):
    return "ran"

@queueable
def fitted_with_lock(i):
    import threading
    # A model object that holds a lock, as some clients do: it cannot travel back.
    return {"score": i, "lock": threading.Lock()} if i else {"score": i}

@queueable
def whoami():
    from nbqueue import current_task
    return current_task()
"""


@pytest.fixture(scope="module")
def nb():
    return notebook(NOTEBOOK + CANARY_SOURCE)


def read_log(log_dir) -> list[int]:
    return [int(line) for f in log_dir.iterdir() for line in f.read_text().split()]


@pytest.mark.slow
def test_four_workers_run_5000_tasks_exactly_once(worker_url, nb, tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    tq = TaskQueue(worker_url)
    job = tq.insert(
        (functools.partial(nb.record, i, str(log_dir)) for i in range(5000)), total=5000, progress=False
    )
    codes = wait_all(start_workers(worker_url, 4, "--burst"), timeout=240)
    assert codes == [0, 0, 0, 0]
    assert job.wait(timeout=30, progress=False).results() == [i * 2 for i in range(5000)]
    executions = read_log(log_dir)
    assert sorted(executions) == list(range(5000))  # every side effect exactly once
    assert len(list(log_dir.iterdir())) >= 2  # the work really was shared
    counts = tq.status()
    assert (counts.inserted, counts.queued, counts.leased, counts.completed, counts.dead) == (
        5000,
        0,
        0,
        5000,
        0,
    )


@pytest.mark.slow
def test_sigkilled_worker_loses_nothing(worker_url, nb, tmp_path):
    marker = tmp_path / "started"
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(nb.slow, 1.5, str(marker))], progress=False)
    (victim,) = start_workers(worker_url, 1, "--lease", "2")
    wait_for(lambda: marker.exists(), what="the task to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (rescuer,) = start_workers(worker_url, 1, "--lease", "2", "--burst")
    assert wait_all([rescuer], timeout=60) == [0]
    (record,) = job.wait(timeout=30, progress=False).records()
    assert record.ok and record.attempt == 2 and record.value == rescuer.pid
    assert len(marker.read_text().split()) == 2
    assert tq.status().leased == 0 and tq.status().queued == 0


@pytest.mark.slow
def test_failing_task_retries_then_dead_letters_then_redrives(worker_url, nb, tmp_path):
    flag = tmp_path / "flag"
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(nb.flaky, str(flag))], progress=False)
    assert wait_all(start_workers(worker_url, 1, "--burst", "--max-attempts", "3"), timeout=60) == [0]
    (error,) = job.wait(timeout=30, progress=False).errors()
    assert error.type == "ValueError" and "no flag" in error.message and error.attempts == 3
    assert "Traceback" in error.traceback and "flaky" in error.traceback
    with pytest.raises(TaskFailed, match="1 of 1 tasks failed"):
        job.results()
    assert job.results(on_error="none") == [None]
    (letter,) = tq.dead()
    assert letter.attempts == 3
    assert tq.status().failed == 3 and tq.status().dead == 1
    flag.write_text("now it works")
    assert tq.redrive() == 1
    assert wait_all(start_workers(worker_url, 1, "--burst"), timeout=60) == [0]
    assert job.wait(timeout=30, progress=False).results() == ["fixed"]
    assert tq.dead() == [] and tq.status().dead == 0


@pytest.mark.slow
def test_a_value_that_cannot_travel_back_is_a_failed_attempt_never_completed(worker_url, nb):
    """At the defaults: retried, then dead with the reason; counts, results() and errors()
    agree, and the job's other task is unaffected."""
    tq = TaskQueue(worker_url)
    job = tq.insert((functools.partial(nb.fitted_with_lock, i) for i in range(2)), progress=False)
    assert wait_all(start_workers(worker_url, 1, "--burst"), timeout=60) == [0]
    job.wait(timeout=30, progress=False)
    counts = job.counts()
    assert (counts.completed, counts.dead, counts.failed) == (1, 1, 3)
    assert job.results(on_error="none") == [{"score": 0}, None]
    with pytest.raises(TaskFailed):
        job.results()
    (error,) = job.errors()
    assert error.type == "SerializationError" and error.attempts == 3
    assert "return value cannot be serialized" in error.message and "lock" in error.message
    assert [letter.task_id for letter in tq.dead()] == [f"{job.id}-1"]


def test_terminal_errors_skip_retries(worker_url, nb):
    tq = TaskQueue(worker_url)
    job = tq.insert([nb.refuse], progress=False)
    assert wait_all(start_workers(worker_url, 1, "--burst"), timeout=60) == [0]
    (error,) = job.wait(timeout=30, progress=False).errors()
    assert error.type == "Terminal" and error.attempts == 1


def test_tampered_task_is_never_unpickled(tmp_path, nb):
    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    good_canary, bad_canary = tmp_path / "good", tmp_path / "bad"
    tq.insert([functools.partial(nb.touch, nb.Canary(str(bad_canary)))], progress=False)
    (segment,) = (tmp_path / "queue" / "queue").iterdir()
    blob = bytearray(segment.read_bytes())
    blob[-40] ^= 0x01  # one bit inside the signed envelope
    segment.write_bytes(bytes(blob))
    control = tq.insert([functools.partial(nb.touch, nb.Canary(str(good_canary)))], progress=False)
    assert wait_all(start_workers(url, 1, "--burst"), timeout=60) == [0]
    assert control.wait(timeout=10, progress=False).results() == ["ran"]
    assert good_canary.exists(), "the canary works when the bytes are genuine"
    assert not bad_canary.exists(), "tampered bytes were unpickled"
    (letter,) = tq.dead()
    [error] = [e for j in tq.jobs() for e in j.errors()]
    assert error.type == "BadSignature" and "bad signature" in error.message
    assert letter.attempts == 1


def test_foreign_file_in_queue_directory_is_quarantined(tmp_path, nb):
    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    (tmp_path / "queue" / "queue" / "0000000000000.notes.txt").write_text("not a task")
    (tmp_path / "queue" / "queue" / "0000000000000.0.jx.bad.0-1").write_bytes(b"garbage")
    job = tq.insert([functools.partial(nb.record, 1, str(tmp_path))], progress=False)
    assert wait_all(start_workers(url, 1, "--burst"), timeout=60) == [0]
    assert job.wait(timeout=10, progress=False).results() == [2]
    reasons = {d.task_id: d.error.decode() for d in tq.dead()}
    assert len(reasons) == 2
    assert any("not an nbqueue task range" in r for r in reasons.values())
    assert any("unreadable task segment" in r for r in reasons.values())


@pytest.mark.slow
def test_sigterm_finishes_the_running_task_and_releases_the_rest(worker_url, nb, tmp_path):
    marker = tmp_path / "started"
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(nb.slow, 1.0, str(marker)) for _ in range(3)], progress=False)
    (worker,) = start_workers(worker_url, 1)
    wait_for(lambda: marker.exists(), what="the first task to start")
    worker.send_signal(signal.SIGTERM)
    assert wait_all([worker], timeout=30) == [0]
    counts = job.counts()
    assert counts.completed == 1 and counts.leased == 0 and counts.queued == 2


def test_producer_failure_part_way_leaves_an_exact_total(tmp_path, nb):
    tq = TaskQueue(f"fq://{tmp_path / 'queue'}")

    def tasks():
        for i in range(1200):
            if i == 700:
                raise RuntimeError("producer broke")
            yield functools.partial(nb.record, i, str(tmp_path))

    with pytest.raises(RuntimeError, match="producer broke") as info:
        tq.insert(tasks(), batch_size=500, progress=False)
    assert "500 task(s) of job" in "".join(getattr(info.value, "__notes__", []))
    (job,) = tq.jobs()
    assert job.total == 500 and job.meta["state"] == "insert_failed"
    assert job.counts().inserted == 500 and tq.status().queued == 500


def test_poll_runs_in_process_on_memory_queue(nb):
    tq = TaskQueue("mem://poll-test")
    job = tq.insert((functools.partial(nb.record, i, "/dev/null") for i in range(0)), progress=False)
    assert job.total == 0 and job.wait(timeout=1, progress=False).results() == []
    job = tq.insert([nb.refuse, functools.partial(nb.slow, 0, os.devnull)], progress=False)
    stats = tq.poll(max_attempts=1, burst=True)
    assert stats.completed == 1 and stats.dead == 1
    values = job.results(on_error="exception")
    assert values[0].type == "Terminal" and values[1] == os.getpid()


def test_local_task_queue_runs_in_local_processes(nb):
    ltq = LocalTaskQueue(parallel=2, progress=False)
    job = ltq.insert(functools.partial(nb.slow, 0, os.devnull) for _ in range(8))
    pids = job.results()
    assert len(pids) == 8 and os.getpid() not in pids


def test_worker_refuses_unmarked_functions_even_if_queued(tmp_path):
    """A payload naming a function that is not @queueable is dead-lettered, not run."""
    from nbqueue.serialize import Signer, get_serializer
    from nbqueue.tasks import TaskCall, TaskCodec

    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    codec = TaskCodec(Signer.default(), get_serializer(), tq.queue_id)
    digest, blob, _ = codec.function_digest(os.getcwd)
    tq.backend.put_function(digest, blob)
    tq.backend.insert("jx", [("jx-0", codec.encode("jx-0", "jx", TaskCall(os.getcwd), digest))])
    assert wait_all(start_workers(url, 1, "--burst"), timeout=60) == [0]
    (letter,) = tq.dead()
    assert b"not marked @queueable" in letter.error


def test_cli_status_jobs_and_dlq(tmp_path, nb):
    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    tq.insert([nb.refuse, nb.refuse], name="doomed", progress=False)

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "nbqueue", *args], capture_output=True, text=True, timeout=60
        )
        return out.returncode, out.stdout, out.stderr

    assert cli("worker", url, "--burst")[0] == 0
    code, out, _ = cli("status", url, "--json")
    assert code == 0 and json.loads(out)["dead"] == 2
    code, out, _ = cli("jobs", url, "--json")
    assert json.loads(out)[0]["name"] == "doomed" and json.loads(out)[0]["dead"] == 2
    code, out, _ = cli("dlq", "list", url, "--json")
    rows = json.loads(out)
    assert [r["type"] for r in rows] == ["Terminal", "Terminal"]
    assert cli("dlq", "redrive", url, rows[0]["task_id"])[0] == 0
    assert tq.status().queued == 1 and tq.status().dead == 1
    assert cli("dlq", "purge", url)[0] == 0
    assert tq.dead() == []
    code, _, err = cli("status", "nope://x")
    assert code == 2 and err.count("\n") == 1 and "unknown queue scheme" in err


@pytest.mark.parametrize("renewal", ["thread", "process"])
def test_a_refused_renewal_of_a_released_lease_does_not_void_the_next_lease(
    worker_url, nb, tmp_path, renewal
):
    """The race behind innocent tasks dead-lettered as WorkerDied: a renewal of lease A refused
    after A was released must not mark lease B of the same task (leased again) as lost."""
    from nbqueue.keeper import LeaseKeeper
    from nbqueue.worker import Renewer

    tq = TaskQueue(worker_url)
    tq.insert([functools.partial(nb.record, 1, str(tmp_path))], progress=False)
    lease_seconds = 0.6
    if renewal == "process":
        renewer = LeaseKeeper(worker_url, lease_seconds, "test:1")
    else:
        renewer = Renewer(tq.backend, lease_seconds)
    renewer.start()
    try:
        (a,) = tq.backend.lease(1, lease_seconds)
        renewer.hold([a])
        assert tq.backend.release(a.task_id, a.token)  # released behind the renewer's back
        assert wait_for(lambda: renewer.has_lost(a), timeout=10), "the renewal of A should be refused"
        (b,) = tq.backend.lease(1, lease_seconds)
        assert b.task_id == a.task_id and b.token != a.token
        renewer.hold([b])
        time.sleep(3 * lease_seconds)  # B lives only if it is renewed
        assert not renewer.has_lost(b)
        renewer.drop(b.task_id)
        assert tq.backend.complete([(b.task_id, b.token, b"done")]) == [True]
    finally:
        renewer.stop()


def test_a_task_knows_its_id_attempt_and_lease_on_a_worker(worker_url, nb, tmp_path):
    from nbqueue import current_task

    assert current_task() is None  # not inside a task
    tq = TaskQueue(worker_url)
    job = tq.insert([functools.partial(nb.whoami), functools.partial(nb.whoami)], progress=False)
    (worker,) = start_workers(worker_url, 1, "--burst")
    assert wait_all([worker], timeout=60) == [0]
    first, second = job.wait(timeout=30, progress=False).results()
    assert [r.task_id for r in job.records()] == [first.task_id, second.task_id]
    assert first.job_id == job.id and first.attempt == 1 and first.worker.endswith(f":{worker.pid}")
    assert len({first.lease_token, second.lease_token}) == 2


def test_a_task_calling_sys_exit_fails_alone_and_the_worker_goes_on():
    nb = notebook("""
import sys
from nbqueue import queueable, Terminal

@queueable
def leave(i):
    if i == 1:
        sys.exit(3)
    if i == 2:
        raise KeyboardInterrupt
    return i
""")
    tq = TaskQueue("mem://sys-exit")
    job = tq.insert([functools.partial(nb.leave, i) for i in range(5)], progress=False)
    stats = tq.poll(max_attempts=1, burst=True)
    assert stats.completed == 3 and stats.dead == 2
    values = job.results(on_error="exception")
    assert [values[i] for i in (0, 3, 4)] == [0, 3, 4]
    assert values[1].type == "SystemExit" and values[2].type == "KeyboardInterrupt"
    assert tq.status().leased == 0


def test_parallel_insert_into_a_memory_queue_keeps_every_task(nb):
    tq = TaskQueue("mem://parallel-list")
    job = tq.insert(
        [functools.partial(nb.record, i, os.devnull) for i in range(40)], parallel=2, progress=False
    )
    assert job.total == 40 and tq.status().queued == 40


def test_worker_processes_get_the_queue_url_out_of_sight(tmp_path, nb):
    """A URL may hold a password: spawned workers (and their lease keepers) get it from the
    environment, never in argv, which every user of the machine can read."""
    url = f"fq://{tmp_path / 'secret-queue'}"
    tq = TaskQueue(url)
    job = tq.insert([functools.partial(nb.slow, 1.0, str(tmp_path / "m"))], progress=False)
    pool = tq.spawn_workers(1, burst=True)
    try:
        wait_for(lambda: (tmp_path / "m").exists(), what="the task to start")
        worker = pool.pids[0]
        with open(f"/proc/{worker}/task/{worker}/children") as f:
            pids = [worker, *(int(p) for p in f.read().split())]
        assert len(pids) == 2  # the worker and its lease keeper
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"secret-queue" not in f.read()
    finally:
        pool.wait(timeout=60)
    assert job.wait(timeout=30, progress=False).counts().completed == 1


def test_worker_url_is_absolute_for_fq_and_keeps_the_redis_url_as_given(tmp_path, monkeypatch, redis_server):
    """A relative fq:// path sent to the Jupyter server (another working directory) opened
    another, empty queue there; worker_url is what other processes are given."""
    monkeypatch.chdir(tmp_path)
    assert TaskQueue("fq://./queues/q").worker_url == f"fq://{tmp_path / 'queues' / 'q'}"
    assert TaskQueue("queues/q").worker_url == f"fq://{tmp_path / 'queues' / 'q'}"
    url = redis_server.url("named")
    assert TaskQueue(url).worker_url == url


def test_a_forced_release_costs_no_attempt_and_causes_no_churn(backend_url, nb):
    """After release_all(force=True) of every lease, a drain costs about what a fresh one does
    and releases nothing (each released task used to come back as a suspect re-run, run alone,
    with its batch-mates released again and again)."""

    def fresh_queue(tag: str) -> TaskQueue:
        if backend_url.startswith("redis://"):
            return TaskQueue(backend_url.replace("queue=", f"queue={tag}"))
        return TaskQueue(f"{backend_url}{tag}")

    timings = {True: [], False: []}
    releases = []
    for trial in range(3):
        for released in (False, True):
            tq = fresh_queue(f"t{trial}{int(released)}")
            job = tq.insert((functools.partial(nb.double, i) for i in range(1000)), progress=False)
            if released:
                assert len(tq.backend.lease(1000, 60)) == 1000  # every task out on a lease
                assert tq.release_all() == 1000
                counts = tq.status()
                assert (counts.queued, counts.leased) == (1000, 0)
            started = time.perf_counter()
            stats = tq.poll(max_tasks=1000)  # no idle tail: the drain itself
            timings[released].append(time.perf_counter() - started)
            assert job.wait(timeout=30, progress=False).results() == [2 * i for i in range(1000)]
            assert all(r.attempt == 1 for r in job.records())  # the release cost no attempt
            if released:
                releases.append(stats.released)
    fresh, after = min(timings[False]), min(timings[True])
    print(f"{backend_url.split(':')[0]}: fresh drain {fresh:.3f}s, after a forced release {after:.3f}s")
    assert max(releases) == 0, releases  # the drain itself releases nothing
    assert after <= 1.5 * fresh, (after, fresh)


def test_poll_in_the_main_thread_puts_back_every_signal_handler_it_took(tmp_path):
    """poll() takes over SIGINT, SIGTERM and the wake-up signal while it runs (a kernel's own
    handlers must come back after it)."""
    import signal

    from nbqueue.worker import HANDLED_SIGNALS

    before = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    TaskQueue(f"fq://{tmp_path / 'q'}", progress=False).poll(burst=True)
    assert {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS} == before
    assert signal.SIGUSR1 in HANDLED_SIGNALS
