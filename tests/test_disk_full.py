"""A full disk (issue 7, item 8): an insert fails with StorageFull and leaves nothing half-written;
a worker whose result cannot be written keeps its lease renewed and commits the result once there
is room again. redis:// at ``maxmemory`` raises StorageFull too.

The fq:// queues live on a real 4 MiB tmpfs, filled with a filler file and freed by deleting it.
Where mounting is not permitted (not root, no CAP_SYS_ADMIN) the disk is a plain directory and
``os.write`` -- in this process and, through a ``sitecustomize`` on PYTHONPATH, in the workers --
fails with ENOSPC past a capacity, counted from the blocks the directory's files really use, as a
full disk would. ``NBQUEUE_TEST_DISK=tmpfs|injected`` forces one of the two.
"""

from __future__ import annotations

import errno
import functools
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbqueue import NbQueueError, StorageFull, TaskQueue
from nbqueue.backends.base import TaskStatus

from .helpers import notebook, wait_for
from .redis_server import RedisServer

NOTEBOOK = """
import os, time
from nbqueue import Terminal, queueable

@queueable
def record(i, log_dir, pad=""):
    with open(os.path.join(log_dir, str(i)), "a") as f:
        f.write(f"{os.getpid()}\\n")
    return i

@queueable
def other(i):
    return -i

@queueable
def held(i, log_dir, go, fail=False):
    # Logs that it ran (once per run), then waits for the test to fill the disk and say go.
    with open(os.path.join(log_dir, str(i)), "a") as f:
        f.write(f"{os.getpid()}\\n")
    while not os.path.exists(go):
        time.sleep(0.02)
    if fail:
        raise Terminal(f"task {i} cannot work")
    return i * 10
"""

DISK_BYTES = 4 * 1024 * 1024
PAGE = 4096
LEASE = 1.0

#: The injected full disk: source of a module run in this process and, as ``sitecustomize``, in
#: every worker and keeper process. Only ``os.write`` is wrapped, which is how fq:// writes bytes.
SHIM = r'''
import errno
import os


def used(root):
    """Bytes the files under ``root`` occupy on disk (hard links once)."""
    seen, total = set(), 0
    for top, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def make_write(root, flag, write):
    """``os.write`` failing with ENOSPC for a file under ``root`` when the blocks it needs would take
    the directory past the capacity written in ``flag`` (no flag file: no limit)."""
    prefix = root.rstrip("/") + "/"

    def full_write(fd, data, /):
        try:
            with open(flag, "rb") as f:
                capacity = int(f.read())
            target = os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, ValueError):
            return write(fd, data)
        if target.startswith(prefix):
            end = os.lseek(fd, 0, os.SEEK_CUR) + len(data)
            need = -(-end // 4096) * 4096 - os.fstat(fd).st_blocks * 512
            if need > 0 and used(root) + need > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    return full_write
'''

SITECUSTOMIZE = (
    SHIM
    + """
if os.environ.get("NBQUEUE_TEST_ENOSPC_ROOT"):
    os.write = make_write(
        os.environ["NBQUEUE_TEST_ENOSPC_ROOT"], os.environ["NBQUEUE_TEST_ENOSPC_FLAG"], os.write
    )
"""
)


class TmpfsDisk:
    """A real 4 MiB tmpfs. ``fill`` writes a filler file until ENOSPC, and while the disk is to stay
    full a thread tops the filler up, so a page another process frees (a heartbeat replacing its
    file) cannot make room for a write the test expects to fail."""

    kind = "tmpfs"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = dict(os.environ)
        self._filler = path / "filler"
        self._stop = threading.Event()
        self._topper: threading.Thread | None = None

    def mount(self) -> bool:
        self.path.mkdir(parents=True)
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(self.path)],
                capture_output=True,
                timeout=30,
            )
        except OSError:  # no mount(8) at all
            return False
        return done.returncode == 0

    def _top_up(self) -> None:
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def fill(self, leave: int = 0) -> None:
        """Leave ``leave`` bytes free (a multiple of the page size)."""
        self._top_up()
        if leave:
            os.truncate(self._filler, os.path.getsize(self._filler) - leave)
            return
        self._stop.clear()
        self._topper = threading.Thread(target=self._keep_full, daemon=True)
        self._topper.start()

    def _keep_full(self) -> None:
        while not self._stop.wait(0.02):
            self._top_up()

    def free(self) -> None:
        self._stop.set()
        if self._topper is not None:
            self._topper.join()
            self._topper = None
        self._filler.unlink()

    def close(self) -> None:
        self._stop.set()
        if self._topper is not None:
            self._topper.join()
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)  # never leave a mount behind


class InjectedDisk:
    """A plain directory whose writes fail with ENOSPC once ``fill`` set a capacity (``SHIM``)."""

    kind = "injected"

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path.mkdir(parents=True)
        self.path = path
        root = os.path.realpath(path)  # /proc/self/fd shows resolved paths
        self._flag = path.parent / f"{path.name}.capacity"
        shim_dir = path.parent / f"{path.name}.shim"
        shim_dir.mkdir()
        (shim_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self._shim: dict = {}
        exec(compile(SHIM, "<enospc shim>", "exec"), self._shim)
        self._root = root
        monkeypatch.setattr(os, "write", self._shim["make_write"](root, str(self._flag), os.write))
        python_path = os.pathsep.join(p for p in (str(shim_dir), os.environ.get("PYTHONPATH")) if p)
        self.env = {
            **os.environ,
            "PYTHONPATH": python_path,
            "NBQUEUE_TEST_ENOSPC_ROOT": root,
            "NBQUEUE_TEST_ENOSPC_FLAG": str(self._flag),
        }

    def fill(self, leave: int = 0) -> None:
        self._flag.write_text(str(self._shim["used"](self._root) + leave))

    def free(self) -> None:
        self._flag.unlink()

    def close(self) -> None:
        self._flag.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """A small disk the test can fill and free: a tmpfs, or the injected fallback."""
    wanted = os.environ.get("NBQUEUE_TEST_DISK", "")
    tmpfs = TmpfsDisk(tmp_path / "disk")
    if wanted != "injected" and tmpfs.mount():
        chosen: TmpfsDisk | InjectedDisk = tmpfs
    elif wanted == "tmpfs":
        pytest.fail("NBQUEUE_TEST_DISK=tmpfs, but mounting a tmpfs is not permitted here", pytrace=False)
    else:
        chosen = InjectedDisk(tmp_path / "injected", monkeypatch)
    try:
        yield chosen
    finally:
        chosen.close()


@pytest.fixture(scope="module")
def nb():
    return notebook(NOTEBOOK)


def files_under(root: Path) -> set[str]:
    """Every file and directory under ``root``, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_no_temp_files(queue_root: Path) -> None:
    assert os.listdir(queue_root / "tmp") == []
    assert [name for name in files_under(queue_root) if name.endswith(".tmp")] == []


def queued_in_listing(queue_root: Path) -> int:
    """Tasks the queue/ names hold (``...<lo>-<hi>``), counted from the directory itself."""
    spans = (name.rsplit(".", 1)[1].split("-") for name in os.listdir(queue_root / "queue"))
    return sum(int(hi) - int(lo) for lo, hi in spans)


def test_storage_full_is_an_nbqueue_error_and_an_os_error():
    exc = StorageFull(errno.ENOSPC, "queue fq:///q: no space left on device")
    assert isinstance(exc, NbQueueError) and isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    # It crosses process boundaries intact (a parallel insert's children raise it to the parent).
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is StorageFull and again.errno == errno.ENOSPC and str(again) == str(exc)


def test_insert_into_a_full_queue_raises_storage_full_and_writes_nothing(disk, nb, tmp_path):
    log = str(tmp_path)
    queue_root = disk.path / "queue"
    tq = TaskQueue(f"fq://{queue_root}")
    first = tq.insert([functools.partial(nb.record, i, log) for i in range(3)], progress=False)
    before = files_under(queue_root)
    disk.fill()
    with pytest.raises(StorageFull) as info:
        tq.insert([functools.partial(nb.record, i, log) for i in range(10)], progress=False)
    exc = info.value
    assert isinstance(exc, NbQueueError) and isinstance(exc, OSError)
    assert exc.errno in (errno.ENOSPC, errno.EDQUOT)
    assert f"queue fq://{queue_root}" in str(exc) and "nothing was half-written" in str(exc)
    # Not one file more or fewer: no temp file, no job record, no range of tasks.
    assert files_under(queue_root) == before
    assert_no_temp_files(queue_root)
    assert [job.id for job in tq.jobs()] == [first.id]
    counts = tq.status()
    assert (counts.inserted, counts.queued, counts.leased) == (3, 3, 0)
    disk.free()
    again = tq.insert([functools.partial(nb.record, i, log) for i in range(10)], progress=False)
    assert again.total == 10 and tq.status().queued == 13 == queued_in_listing(queue_root)


@pytest.mark.parametrize(
    ("leave", "second_batch", "recorded"),
    [
        # The second batch's tasks do not fit: its segment is refused.
        pytest.param(4 * PAGE, 50, True, id="segment-refused"),
        # Its tasks fit in the last page but the counters do not: it must not be queued uncounted.
        pytest.param(PAGE, 1, True, id="counters-refused"),
        # Nothing fits, not even the job's record of what happened: the counters must say it.
        pytest.param(0, 50, False, id="record-refused-too"),
    ],
)
def test_a_disk_filling_part_way_leaves_the_batches_that_landed_queued_and_counted(
    disk, nb, tmp_path, leave, second_batch, recorded
):
    log = str(tmp_path)
    queue_root = disk.path / "queue"
    tq = TaskQueue(f"fq://{queue_root}")
    pad = "x" * 1000  # about 1.5 KB a task: a 50-task batch needs far more than four pages

    def tasks():
        for i in range(50 + second_batch):
            if i == 50:  # the first batch of 50 is written by now
                disk.fill(leave)
            yield functools.partial(nb.record, i, log, pad)

    with pytest.raises(StorageFull) as info:
        tq.insert(tasks(), batch_size=50, progress=False)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "50 task(s) of job" in notes
    assert_no_temp_files(queue_root)
    (job,) = tq.jobs()
    assert job.counts().inserted == 50 and tq.status().queued == 50 == queued_in_listing(queue_root)
    if recorded:
        assert job.meta["state"] == "insert_failed" and job.total == 50
        assert job.meta["error"].startswith("StorageFull")
    else:
        assert "could not say so" in notes and "job.counts().inserted" in notes
        assert job.meta["state"] == "inserting"
    disk.free()
    # The 50 that landed run as any others.
    assert tq.poll(lease_seconds=30, burst=True).completed == 50
    assert [r.value for r in job.records()] == list(range(50))
    assert tq.status().completed == 50 and tq.status().queued == 0


def _start_worker(url: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nbqueue", "worker", url, "--lease", str(LEASE), "--burst", "-v"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _reap(worker: subprocess.Popen) -> None:
    """Never leave a worker running or its pipe open, whatever failed."""
    if worker.poll() is None:
        worker.kill()
    if worker.stderr is not None and not worker.stderr.closed:
        worker.communicate()


def _stay_leased_while_full(tq: TaskQueue, task_id: str, worker: subprocess.Popen, seconds: float) -> None:
    """For ``seconds`` (several leases), the worker waits with its task leased and renewed."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert worker.poll() is None, "the worker exited while the disk was full"
        counts = tq.status()
        assert (counts.leased, counts.completed, counts.queued) == (1, 0, 0), counts
        time.sleep(0.1)
    info = tq.backend.find_task(task_id)
    # A lease of one second, filled more than three seconds ago: still ahead only if renewed.
    assert info is not None, "the task vanished"
    assert (info.status, info.attempts) == (TaskStatus.LEASED, 1) and info.expires_in > 0, info.expires_in


@pytest.mark.slow
@pytest.mark.parametrize("fails", [False, True], ids=["result", "failure-report"])
def test_a_worker_holds_its_result_while_the_disk_is_full_and_commits_it_once(disk, nb, tmp_path, fails):
    """The result of a task (or, for one that fails, its error record and dead letter) waits in the
    worker, its lease renewed, until the disk has room; then it is written once, as attempt 1."""
    log_dir, go = tmp_path / "log", tmp_path / "go"
    log_dir.mkdir()
    queue_root = disk.path / "queue"
    url = f"fq://{queue_root}"
    tq = TaskQueue(url)
    job = tq.insert([functools.partial(nb.held, 7, str(log_dir), str(go), fails)], progress=False)
    worker = _start_worker(url, disk.env)
    try:
        wait_for(lambda: (log_dir / "7").exists(), what="the task to start")
        disk.fill()
        go.touch()  # the task returns now, and its result does not fit
        _stay_leased_while_full(tq, f"{job.id}-0", worker, 3.5 * LEASE)
        assert tq.backend.results(job.id) == {}
        disk.free()
        _, stderr = worker.communicate(timeout=60)
    finally:
        _reap(worker)
    assert worker.returncode == 0, stderr
    (record,) = job.wait(timeout=10, progress=False).records()
    assert record.attempt == 1 and record.worker.endswith(f":{worker.pid}")
    assert (log_dir / "7").read_text().split() == [str(worker.pid)]  # the side effect ran once
    counts = tq.status()
    if fails:
        assert not record.ok and record.error.type == "Terminal"
        (letter,) = tq.dead()
        assert letter.task_id == f"{job.id}-0" and letter.attempts == 1
        assert (counts.inserted, counts.queued, counts.leased, counts.failed, counts.dead) == (1, 0, 0, 1, 1)
    else:
        assert record.ok and record.value == 70
        assert (counts.inserted, counts.queued, counts.leased, counts.completed, counts.failed) == (
            1,
            0,
            0,
            1,
            0,
        )
    # Said once that the storage is full and once that it has room again; it never crashed.
    assert stderr.count("waiting for space") == 1, stderr
    assert stderr.count("storage has space again") == 1, stderr
    done = "1 failed (1 dead)" if fails else "1 completed"
    assert done in stderr and "0 abandoned" in stderr and "0 refused" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert_no_temp_files(queue_root)


@pytest.mark.slow
def test_a_worker_told_to_stop_while_the_disk_is_full_leaves_its_lease_to_expire(disk, nb, tmp_path):
    log_dir, go = tmp_path / "log", tmp_path / "go"
    log_dir.mkdir()
    url = f"fq://{disk.path / 'queue'}"
    tq = TaskQueue(url)
    job = tq.insert([functools.partial(nb.held, 3, str(log_dir), str(go))], progress=False)
    first = _start_worker(url, disk.env)
    try:
        wait_for(lambda: (log_dir / "3").exists(), what="the task to start")
        disk.fill()
        go.touch()
        _stay_leased_while_full(tq, f"{job.id}-0", first, 1.5 * LEASE)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=30)  # it gives up waiting: it does not hang
    finally:
        _reap(first)
    assert first.returncode == 0, stderr
    assert "told to stop while the storage is full" in stderr and "1 abandoned" in stderr, stderr
    disk.free()
    second = _start_worker(url, disk.env)
    try:
        _, stderr = second.communicate(timeout=60)
    finally:
        _reap(second)
    assert second.returncode == 0, stderr
    (record,) = job.wait(timeout=10, progress=False).records()
    assert record.ok and record.attempt == 2 and record.worker.endswith(f":{second.pid}")
    assert tq.status().completed == 1 and tq.status().leased == 0


# -- redis:// at maxmemory -------------------------------------------------------------------------
REDIS_MAXMEMORY = 8 * 1024 * 1024


def _fill_redis(client) -> None:
    """Fill the server to its maxmemory (noeviction) with keys outside any queue's."""
    from redis.exceptions import OutOfMemoryError

    for i in range(10_000):
        try:
            client.set(f"filler:{i}", b"\0" * 65536)
        except OutOfMemoryError:
            break
    else:
        raise AssertionError("redis never reached its maxmemory")
    # A refused write frees its own request again, which can leave the server a few bytes under its
    # limit: lower the limit just below what it holds, so it stays full for every write.
    client.config_set("maxmemory", client.info("memory")["used_memory"] - 64 * 1024)


def _free_redis(client) -> None:
    client.delete(*client.scan_iter(match="filler:*"))
    client.config_set("maxmemory", REDIS_MAXMEMORY)


def _snapshot(client, prefix: str) -> dict[bytes, bytes]:
    """Every key of a queue with its serialized value."""
    return {key: client.dump(key) for key in client.scan_iter(match=f"{prefix}*")}


@pytest.fixture
def small_redis(tmp_path):
    """A private redis-server (a free port, never 6379) that holds 8 MB at most, evicting nothing."""
    limits = ["--maxmemory", str(REDIS_MAXMEMORY), "--maxmemory-policy", "noeviction"]
    server = RedisServer(tmp_path / "small-redis", limits)
    server.start()
    client = server.client()
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def test_insert_into_redis_at_maxmemory_raises_storage_full_and_inserts_nothing(small_redis, nb, tmp_path):
    server, client = small_redis
    log = str(tmp_path)
    tq = TaskQueue(server.url("full"))
    first = tq.insert([functools.partial(nb.record, i, log) for i in range(3)], progress=False)
    _fill_redis(client)
    before = _snapshot(client, "nbq:{full}:")
    with pytest.raises(StorageFull) as info:
        tq.insert([functools.partial(nb.record, i, log) for i in range(10)], progress=False)
    exc = info.value
    assert isinstance(exc, NbQueueError) and exc.errno == errno.ENOSPC
    assert tq.url in str(exc) and "maxmemory" in str(exc) and "nothing was half-written" in str(exc)
    assert _snapshot(client, "nbq:{full}:") == before  # not one key changed
    assert [job.id for job in tq.jobs()] == [first.id]
    assert (tq.status().inserted, tq.status().queued) == (3, 3)
    _free_redis(client)
    assert tq.insert([functools.partial(nb.record, i, log) for i in range(10)], progress=False).total == 10
    assert tq.status().queued == 13


def test_redis_filling_part_way_keeps_the_batch_that_landed_and_nothing_of_the_next(
    small_redis, nb, tmp_path
):
    server, client = small_redis
    log = str(tmp_path)
    tq = TaskQueue(server.url("partway"))

    def tasks():
        for i in range(100):
            if i == 50:  # the first batch is written; the next one brings a new function
                _fill_redis(client)
            yield functools.partial(nb.record, i, log) if i < 50 else functools.partial(nb.other, i)

    with pytest.raises(StorageFull) as info:
        tq.insert(tasks(), batch_size=50, progress=False)
    notes = "".join(getattr(info.value, "__notes__", []))
    # The job's record is a write too, refused like the rest: the note and the counters say it.
    assert "50 task(s) of job" in notes and "could not say so" in notes
    (job,) = tq.jobs()
    assert job.counts().inserted == 50 and tq.status().queued == 50
    assert client.hlen("nbq:{partway}:payload") == 50
    assert client.llen(f"nbq:{{partway}}:ready:{job.id}") == 50  # the job's ready list
    assert len(list(tq.backend.iter_functions())) == 1  # the second function was not stored
    _free_redis(client)
    assert tq.poll(lease_seconds=30, burst=True).completed == 50
    assert [r.value for r in job.records()] == list(range(50))
