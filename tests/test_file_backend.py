"""fq:// specifics beyond the shared contract: counters, layout, orphan repair."""

from __future__ import annotations

import os
import signal
import time

import pytest

from nbqueue.backends import file as file_backend
from nbqueue.backends.file import FileBackend

from .helpers import tasks_of


def test_status_lists_only_counters_and_state_names_never_results(tmp_path, monkeypatch):
    q = FileBackend(str(tmp_path / "q"))
    for b in range(20):
        q.insert(f"j{b}", tasks_of(f"j{b}", 500))
    listed: list[str] = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(str(p)) or real_listdir(p))
    assert q.counts().queued == 10_000 and q.job_counts("j3").queued == 500
    # Counters, and the short lists of state names (one per batch or lease): never done/.
    areas = ("counters", "queue", "claim", "leased", "completing")
    assert listed and all(p.rsplit("/", 1)[-1] in areas for p in listed), listed
    monkeypatch.undo()
    # One queue/ entry per insert batch: a listing stays short as tasks grow.
    assert len(os.listdir(tmp_path / "q" / "queue")) == 20


def test_rezero_while_another_process_holds_counters(tmp_path):
    producer = FileBackend(str(tmp_path / "q"))
    admin = FileBackend(str(tmp_path / "q"))
    producer.insert("j", tasks_of("j", 10))
    c = admin.rezero()
    assert (c.inserted, c.queued) == (0, 10)
    producer.lease(3, 30)  # the producer's next counter write must not bring back old deltas
    c = admin.counts()
    assert (c.inserted, c.queued, c.leased) == (0, 7, 3)


def test_counter_file_folds_when_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(file_backend, "COUNTER_FILE_FOLD_BYTES", 2_000)
    q = FileBackend(str(tmp_path / "q"))
    for b in range(60):
        q.insert(f"job{b}", tasks_of(f"job{b}", 2))
    files = [n for n in os.listdir(tmp_path / "q" / "counters") if not n.startswith(".")]
    assert len(files) <= 2  # the base file and at most one live file
    assert q.counts().inserted == 120 and q.job_counts("job0").inserted == 2
    assert q.job_counts("job59").queued == 2


def test_close_folds_counts_into_the_base_file(tmp_path):
    q = FileBackend(str(tmp_path / "q"))
    q.insert("j", tasks_of("j", 5))
    q.close()
    assert sorted(os.listdir(tmp_path / "q" / "counters")) == [".lock", "base"]
    assert FileBackend(str(tmp_path / "q")).counts().queued == 5


def test_orphaned_claim_from_a_killed_process_is_queued_again(tmp_path, monkeypatch):
    q = FileBackend(str(tmp_path / "q"))
    q.insert("j", tasks_of("j", 4))
    (name,) = os.listdir(tmp_path / "q" / "queue")
    # A process renamed the range into claim/ and died before splitting it into leases.
    os.rename(tmp_path / "q" / "queue" / name, tmp_path / "q" / "claim" / f"0000000000001.dead.{name}")
    monkeypatch.setattr(file_backend, "ORPHAN_SECONDS", 0.0)
    got = q.lease(10, 30)
    assert sorted(lease.task_id for lease in got) == [f"j-{i}" for i in range(4)]


def test_foreign_files_in_any_area_never_break_leasing(tmp_path):
    q = FileBackend(str(tmp_path / "q"))
    q.insert("j", tasks_of("j", 3))
    for area, name in [
        ("claim", "README"),
        ("completing", "notes.txt"),
        ("dead", ".nfs0001"),
        ("joborder", "stray"),
        ("leased", "junk"),
    ]:
        (tmp_path / "q" / area / name).write_text("not ours")
    got = q.lease(10, 30)  # reclaim scans every area first
    assert len(got) == 3
    assert q.list_jobs() == [] and q.rezero().leased == 3
    reasons = {d.task_id: d.error for d in q.dead()}
    assert "quarantine/README" in reasons and "quarantine/notes.txt" in reasons


def test_rezero_then_close_does_not_count_twice(tmp_path):
    producer = FileBackend(str(tmp_path / "q"))
    producer.insert("j", tasks_of("j", 10))
    FileBackend(str(tmp_path / "q")).rezero()
    producer.close()  # folds only what changed since the recount: nothing
    c = FileBackend(str(tmp_path / "q")).counts()
    assert (c.inserted, c.queued) == (0, 10)


def test_complete_after_own_renewal_leaves_no_lease_behind(tmp_path):
    worker = FileBackend(str(tmp_path / "q"))
    keeper = FileBackend(str(tmp_path / "q"))  # renews from another process, as the lease keeper does
    worker.insert("j", tasks_of("j", 1))
    (lease,) = worker.lease(1, 30)
    assert keeper.renew(lease.task_id, lease.token, 60)  # renames the lease under the worker
    assert worker.complete([(lease.task_id, lease.token, b"r")]) == [True]
    assert os.listdir(tmp_path / "q" / "leased") == []
    c = worker.counts()
    assert (c.leased, c.completed) == (0, 1)


def test_counter_files_are_folded_when_a_process_exits(tmp_path):
    from .helpers import run_python

    for _ in range(3):
        done = run_python(
            "import sys\nfrom nbqueue.backends.file import FileBackend\n"
            "FileBackend(sys.argv[1]).insert('j', [('j-' + sys.argv[2], b'p')])",
            str(tmp_path / "q"),
            str(_),
        )
        assert done.returncode == 0, done.stderr
    names = [n for n in os.listdir(tmp_path / "q" / "counters") if not n.startswith(".")]
    assert names == ["base"]
    assert FileBackend(str(tmp_path / "q")).counts().queued == 3


def test_fail_and_release_after_a_renewal_by_another_handle(tmp_path):
    worker = FileBackend(str(tmp_path / "q"))
    keeper = FileBackend(str(tmp_path / "q"))  # the lease keeper renames leases as it renews them
    worker.insert("j", tasks_of("j", 2))
    dead, back = sorted(worker.lease(2, 30), key=lambda lease: lease.task_id)
    assert keeper.renew(dead.task_id, dead.token, 60) and keeper.renew(back.task_id, back.token, 60)
    assert worker.fail(dead.task_id, dead.token, b"error", None) == "dead"
    assert worker.release(back.task_id, back.token) is True
    assert os.listdir(tmp_path / "q" / "leased") == [] and os.listdir(tmp_path / "q" / "completing") == []
    c = worker.counts()
    assert (c.leased, c.dead, c.queued) == (0, 1, 1)


@pytest.mark.parametrize("killed_in", ["lease", "complete"])
def test_a_process_killed_before_its_counter_write_leaves_no_phantom_state(tmp_path, killed_in):
    """Found by the kill storm: a worker SIGKILLed between a rename and its counter write left
    phantom leases (or queued=k, leased=-k) that kept burst workers waiting; queued and leased
    now come from the names themselves."""
    root = str(tmp_path / "q")
    q = FileBackend(root)
    q.insert("job", tasks_of("job", 2))
    pid = os.fork()
    if pid == 0:  # the doomed worker: dies holding its leases, or at its counter write
        w = FileBackend(root)
        leases = w.lease(2, 0.2 if killed_in == "lease" else 30)
        w._flush = lambda: os.kill(os.getpid(), signal.SIGKILL)
        if killed_in == "lease":
            os.kill(os.getpid(), signal.SIGKILL)
        w.complete([(lease.task_id, lease.token, b"r") for lease in leases])
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    if killed_in == "lease":
        assert q.counts().leased == 2  # really leased, to a dead worker
        time.sleep(0.3)  # its leases expire, are reclaimed and leased again here
        leases = q.lease(2, 30)
        assert q.complete([(lease.task_id, lease.token, b"r") for lease in leases]) == [True, True]
    c = q.counts()
    assert (c.queued, c.leased) == (0, 0) and q.job_counts("job").leased == 0
    assert q.exact_job_finished("job") == 2


def test_a_claimer_killed_mid_split_gets_only_its_unlinked_tasks_queued_again(tmp_path, monkeypatch):
    """Found by the kill-storm soak: the orphan repair queued the whole claimed range again, so
    the rest (already back in the queue) and the dead claimer's leases ran twice."""
    root = str(tmp_path / "q")
    q = FileBackend(root)
    q.insert("job", tasks_of("job", 10))
    pid = os.fork()
    if pid == 0:  # the claimer dies after giving back the rest (4-10) and leasing task 0
        links = 0
        real_link = os.link

        def dying_link(src, dst):
            nonlocal links
            links += 1
            if links == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real_link(src, dst)

        os.link = dying_link
        FileBackend(root).lease(4, 0.2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert len(os.listdir(os.path.join(root, "claim"))) == 1
    monkeypatch.setattr(file_backend, "ORPHAN_SECONDS", 0.3)
    time.sleep(0.4)  # the lease of task 0 expires; the claim is an orphan
    leased = []
    while batch := q.lease(100, 30):
        leased += batch
    attempts = {lease.task_id: lease.attempt for lease in leased}
    assert sorted(lease.task_id for lease in leased) == sorted(f"job-{i}" for i in range(10))  # once each
    assert attempts["job-0"] == 2 and all(attempts[f"job-{i}"] == 1 for i in range(1, 10))
    assert os.listdir(os.path.join(root, "claim")) == []


def test_a_committer_killed_after_its_record_landed_is_cleaned_up_soon(tmp_path, monkeypatch):
    """Found by the kill-storm soak: a worker killed between linking its result and dropping its
    completing/ name left the task counted as leased for half a minute."""
    root = str(tmp_path / "q")
    q = FileBackend(root)
    q.insert("job", tasks_of("job", 1))
    pid = os.fork()
    if pid == 0:
        w = FileBackend(root)
        (lease,) = w.lease(1, 0.2)
        real_unlink = os.unlink

        def dying_unlink(path, *args, **kwargs):
            if "/completing/" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            real_unlink(path, *args, **kwargs)

        os.unlink = dying_unlink
        w.complete([(lease.task_id, lease.token, b"r")])
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and q.counts().leased == 1 and q.exact_job_finished("job") == 1
    monkeypatch.setattr(file_backend, "COMPLETED_GRACE_SECONDS", 0.1)
    time.sleep(0.4)  # the lease ended; ORPHAN_SECONDS (30 s) has not
    assert q.lease(1, 30) == []  # the reclaim drops the name, and nothing runs again
    assert q.counts().leased == 0 and os.listdir(os.path.join(root, "completing")) == []


def test_a_purge_by_another_process_does_not_break_the_next_commit(tmp_path):
    """A per-process cache of the done/<job> directories went stale when another handle purged."""
    root = str(tmp_path / "q")
    worker, admin = FileBackend(root), FileBackend(root)
    worker.put_results("j", [("j-0", b"r")])
    admin.purge()
    worker.put_results("j", [("j-0", b"r")])
    worker.insert("k", tasks_of("k", 1))
    (lease,) = worker.lease(1, 30)
    admin.purge()
    admin.insert("k", tasks_of("k", 1))
    (lease,) = worker.lease(1, 30)
    assert worker.complete([(lease.task_id, lease.token, b"r")]) == [True]
    assert admin.exact_job_finished("k") == 1


def test_a_partial_segment_read_agrees_with_decoding_the_whole_file(tmp_path):
    from nbqueue.backends import segments

    frames = [(f"j-{i}", os.urandom(i % 7) * 3) for i in range(40)]
    path = tmp_path / "seg"
    path.write_bytes(segments.encode(frames))
    for lo, hi in [(0, None), (0, 1), (5, 9), (39, 40), (38, 99), (40, 40)]:
        with open(path, "rb") as f:
            assert segments.read(f, lo, hi) == segments.decode(path.read_bytes(), lo, hi) == frames[lo:hi]
    path.write_bytes(segments.encode(frames)[:-1])  # one byte short: refused, as decode refuses it
    with open(path, "rb") as f, pytest.raises(segments.CorruptSegment):
        segments.read(f, 0, 1)


def test_reclaimed_neighbours_go_back_as_one_range(tmp_path):
    """Leases taken back together (expired, or released by force) are queued as runs of
    consecutive tasks, not one name each: leasing them again costs a claim per run."""
    from nbqueue.backends.file import FileBackend

    backend = FileBackend(str(tmp_path / "q"))
    backend.insert("j1", tasks_of("j1", 10))
    leases = backend.lease(10, 30)
    assert backend.complete([(leases[4].task_id, leases[4].token, b"done")]) == [True]
    assert backend.release_all(force=True) == 9
    assert sorted(name.rsplit(".", 1)[1] for name in os.listdir(tmp_path / "q" / "queue")) == ["0-4", "5-10"]
    assert os.listdir(tmp_path / "q" / "claim") == []
    again = backend.lease(10, 30)
    assert sorted(lease.task_id for lease in again) == [f"j1-{i}" for i in range(10) if i != 4]
    assert all(lease.attempt == 1 and not lease.suspect for lease in again)


def test_a_reclaim_that_stalls_past_the_orphan_repair_queues_each_task_once(tmp_path, monkeypatch):
    """Leases staged in claim/ by a reclaim that then stalls beyond ORPHAN_SECONDS may be
    repaired by another process meanwhile; the rename that wins decides who queues each task."""
    root = str(tmp_path / "q")
    a, b = FileBackend(root), FileBackend(root)
    a.insert("j1", tasks_of("j1", 3))
    assert len(a.lease(3, 0.05)) == 3
    time.sleep(0.1)
    requeue = FileBackend._requeue_runs

    def stalled(self, now, job, seg, field, claims):
        k, claim = claims[1]  # another process repairs the middle task's claim first
        b._repair_claim(claim, claim.split(".", 2)[2])
        return requeue(self, now, job, seg, field, claims)

    monkeypatch.setattr(FileBackend, "_requeue_runs", stalled)
    assert a.release_all() == 3
    monkeypatch.undo()
    assert a.counts().queued == 3
    again = []
    while leases := a.lease(10, 30):
        again += [lease.task_id for lease in leases]
    assert sorted(again) == ["j1-0", "j1-1", "j1-2"]


def test_a_commit_whose_process_died_comes_back_as_a_suspect(tmp_path, monkeypatch):
    root = tmp_path / "q"
    backend = FileBackend(str(root))
    backend.insert("j1", tasks_of("j1", 1))
    (lease,) = backend.lease(1, 0.05)
    name = backend._find_lease(lease.token)
    os.rename(root / "leased" / name, root / "completing" / name)  # the committer dies here
    time.sleep(0.1)
    monkeypatch.setattr(file_backend, "ORPHAN_SECONDS", 0)
    monkeypatch.setattr(file_backend, "COMPLETED_GRACE_SECONDS", 0)
    backend.release_all()
    (again,) = backend.lease(1, 30)
    assert (again.attempt, again.suspect, again.charged) == (2, True, 1)


def test_a_range_being_claimed_by_another_worker_is_not_reported_empty(tmp_path):
    """Found by a flaky multi-queue test: while one worker claimed a range (renamed out of queue/,
    its rest not linked back yet) another's lease found the job empty and went on to a lower
    queue. Now a lease waits for young claims to settle before it answers "nothing ready"."""
    import threading

    root = str(tmp_path / "q")
    slow, other = FileBackend(root), FileBackend(root)
    slow.insert("job", tasks_of("job", 4))
    real_read = slow._read_frames
    claimed = threading.Event()

    def slow_read(*args):  # a slow disk between the claim and giving the rest back
        claimed.set()
        time.sleep(0.2)
        return real_read(*args)

    slow._read_frames = slow_read
    taker = threading.Thread(target=slow.lease, args=(1, 30))
    taker.start()
    assert claimed.wait(5)
    assert os.listdir(os.path.join(root, "queue")) == []  # the moment the job looks empty
    got = other.lease(1, 30, wait=0)
    taker.join()
    assert len(got) == 1 and got[0].task_id != "job-0"
