"""The storage contract (nbqueue/backends/base.py), run unchanged against every backend."""

from __future__ import annotations

import threading
import time

import pytest

from nbqueue.backends.base import TaskStatus


def tasks_of(job: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{job}-{i}", f"payload {i}".encode()) for i in range(start, start + n)]


def test_insert_then_lease_hands_out_payloads(backend):
    backend.insert("j1", tasks_of("j1", 3))
    c = backend.counts()
    assert (c.inserted, c.queued, c.leased) == (3, 3, 0)
    leases = backend.lease(10, 30)
    assert sorted(lease.task_id for lease in leases) == ["j1-0", "j1-1", "j1-2"]
    assert {lease.payload for lease in leases} == {b"payload 0", b"payload 1", b"payload 2"}
    assert all(lease.attempt == 1 for lease in leases)
    assert len({lease.token for lease in leases}) == 3
    c = backend.counts()
    assert (c.queued, c.leased) == (0, 3)


def test_lease_respects_n_and_empty_queue_returns_quickly(backend):
    backend.insert("j1", tasks_of("j1", 5))
    assert len(backend.lease(2, 30)) == 2
    assert len(backend.lease(10, 30)) == 3
    t = time.monotonic()
    assert backend.lease(10, 30) == []
    assert time.monotonic() - t < 0.5


def test_complete_commits_exactly_once_and_refuses_stale_tokens(backend):
    backend.insert("j1", tasks_of("j1", 2))
    a, b = sorted(backend.lease(2, 30), key=lambda lease: lease.task_id)
    assert backend.complete([(a.task_id, "not-the-token", b"bad")]) == [False]
    assert backend.complete([(a.task_id, a.token, b"ra"), (b.task_id, b.token, b"rb")]) == [True, True]
    assert backend.complete([(a.task_id, a.token, b"again")]) == [False]
    assert backend.results("j1") == {"j1-0": b"ra", "j1-1": b"rb"}
    c = backend.counts()
    assert (c.queued, c.leased, c.completed) == (0, 0, 2)
    assert backend.job_counts("j1").completed == 2


def test_renew_extends_and_is_fenced(backend):
    backend.insert("j1", tasks_of("j1", 1))
    (lease,) = backend.lease(1, 0.6)
    assert backend.renew(lease.task_id, "wrong", 5) is False
    time.sleep(0.3)
    assert backend.renew(lease.task_id, lease.token, 5) is True
    time.sleep(0.5)  # past the first deadline, inside the renewed one
    assert backend.lease(1, 30) == []
    assert backend.complete([(lease.task_id, lease.token, b"ok")]) == [True]


def test_expired_lease_returns_task_and_fences_the_late_worker(backend):
    backend.insert("j1", tasks_of("j1", 1))
    (first,) = backend.lease(1, 0.3)
    time.sleep(0.5)
    (second,) = backend.lease(1, 30)
    assert second.task_id == first.task_id
    assert second.attempt == 2 and second.token != first.token
    assert backend.renew(first.task_id, first.token, 30) is False
    assert backend.complete([(first.task_id, first.token, b"late")]) == [False]
    assert backend.fail(first.task_id, first.token, b"late", None) is None
    assert backend.complete([(second.task_id, second.token, b"on time")]) == [True]
    assert backend.results("j1") == {"j1-0": b"on time"}
    c = backend.counts()
    assert (c.queued, c.leased, c.completed) == (0, 0, 1)


def test_fail_with_retry_requeues_after_the_delay(backend):
    backend.insert("j1", tasks_of("j1", 1))
    (lease,) = backend.lease(1, 30)
    assert backend.fail(lease.task_id, lease.token, b"boom", 0.4) == TaskStatus.QUEUED
    c = backend.counts()
    assert (c.queued, c.leased, c.failed) == (1, 0, 1)
    assert backend.lease(1, 30) == []  # not ready yet
    time.sleep(0.6)
    (again,) = backend.lease(1, 30)
    assert again.task_id == lease.task_id and again.attempt == 2


def test_fail_without_retry_goes_to_dead_letters_and_redrives(backend):
    backend.insert("j1", tasks_of("j1", 2))
    for lease in backend.lease(2, 30):
        assert (
            backend.fail(lease.task_id, lease.token, b"err " + lease.task_id.encode(), None)
            == TaskStatus.DEAD
        )
    c = backend.counts()
    assert (c.queued, c.leased, c.dead, c.failed) == (0, 0, 2, 2)
    dead = sorted(backend.dead(), key=lambda d: d.task_id)
    assert [(d.task_id, d.attempts, d.payload, d.error) for d in dead] == [
        ("j1-0", 1, b"payload 0", b"err j1-0"),
        ("j1-1", 1, b"payload 1", b"err j1-1"),
    ]
    assert backend.results("j1") == {"j1-0": b"err j1-0", "j1-1": b"err j1-1"}
    assert backend.redrive(["j1-0"]) == 1
    assert backend.counts().dead == 1 and backend.counts().queued == 1
    (lease,) = backend.lease(5, 30)
    assert (lease.task_id, lease.attempt, lease.payload) == ("j1-0", 1, b"payload 0")
    assert backend.complete([(lease.task_id, lease.token, b"fixed")]) == [True]
    assert backend.results("j1")["j1-0"] == b"fixed"
    assert backend.purge_dead() == 1
    assert backend.dead() == [] and backend.counts().dead == 0


def test_release_gives_back_without_counting_an_attempt(backend):
    backend.insert("j1", tasks_of("j1", 1))
    (lease,) = backend.lease(1, 30)
    assert backend.release(lease.task_id, "wrong") is False
    assert backend.release(lease.task_id, lease.token) is True
    assert backend.release(lease.task_id, lease.token) is False
    (again,) = backend.lease(1, 30)
    assert again.attempt == 1
    c = backend.counts()
    assert (c.queued, c.leased) == (0, 1)


def test_release_all_moves_expired_or_all_leases(backend):
    backend.insert("j1", tasks_of("j1", 3))
    backend.lease(2, 30)
    assert backend.release_all() == 0
    assert backend.release_all(force=True) == 2
    c = backend.counts()
    assert (c.queued, c.leased) == (3, 0)


def test_function_blobs_are_stored_once_by_digest(backend):
    backend.put_function("ab" * 32, b"blob")
    backend.put_function("ab" * 32, b"blob")
    assert backend.get_function("ab" * 32) == b"blob"
    with pytest.raises(KeyError):
        backend.get_function("cd" * 32)


def test_job_records_and_per_job_counts(backend):
    backend.put_job("ja", b"meta a")
    backend.put_job("jb", b"meta b")
    backend.put_job("ja", b"meta a2")
    assert backend.get_job("ja") == b"meta a2"
    assert backend.get_job("nope") is None
    assert backend.list_jobs() == ["ja", "jb"]
    backend.insert("ja", tasks_of("ja", 2))
    backend.insert("jb", tasks_of("jb", 3))
    leases = backend.lease(10, 30)
    backend.complete(
        [(lease.task_id, lease.token, b"r") for lease in leases if lease.task_id.startswith("jb")]
    )
    a, b = backend.job_counts("ja"), backend.job_counts("jb")
    assert (a.inserted, a.leased, a.completed) == (2, 2, 0)
    assert (b.inserted, b.leased, b.completed) == (3, 0, 3)
    assert backend.job_counts("unknown").inserted == 0


def test_insert_refuses_bad_ids_and_queues_nothing(backend):
    with pytest.raises(ValueError):
        backend.insert("j1", [("j1-0", b"x"), ("../evil-1", b"y")])
    with pytest.raises(ValueError):
        backend.insert("j1", [("other-0", b"x")])
    with pytest.raises(ValueError):
        backend.insert("../j", [])
    assert backend.counts().queued == 0
    assert backend.lease(10, 30) == []


def test_purge_and_rezero(backend):
    backend.insert("j1", tasks_of("j1", 4))
    backend.put_job("j1", b"m")
    (lease, *_rest) = backend.lease(1, 30)
    backend.fail(lease.task_id, lease.token, b"e", 0)
    c = backend.rezero()
    assert (c.inserted, c.failed, c.queued) == (0, 0, 4)
    backend.purge()
    assert backend.counts().as_dict() == dict.fromkeys(
        ("inserted", "queued", "leased", "completed", "failed", "dead"), 0
    )
    assert backend.lease(10, 30) == [] and backend.list_jobs() == []


def test_iter_queued_lists_waiting_tasks(backend):
    backend.insert("j1", tasks_of("j1", 3))
    backend.lease(1, 30)
    got = dict(backend.iter_queued())
    assert len(got) == 2 and all(v.startswith(b"payload") for v in got.values())


def test_large_payload_round_trips(backend):
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    backend.insert("j1", [("j1-0", big)])
    (lease,) = backend.lease(1, 30)
    assert lease.payload == big
    backend.complete([(lease.task_id, lease.token, big)])
    assert backend.results("j1")["j1-0"] == big


def test_concurrent_leases_never_hand_out_a_task_twice(backend, backend_factory):
    backend.insert("j1", tasks_of("j1", 400))
    seen: list[str] = []
    lock = threading.Lock()

    def drain():
        other = backend_factory()
        while True:
            got = other.lease(7, 30)
            if not got:
                return
            with lock:
                seen.extend(lease.task_id for lease in got)
            other.complete([(lease.task_id, lease.token, b"r") for lease in got])

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 400 and len(set(seen)) == 400
    assert backend.counts().completed == 400


def test_lease_with_wait_wakes_when_work_arrives(backend, backend_factory):
    def later():
        time.sleep(0.3)
        backend_factory().insert("j1", tasks_of("j1", 1))

    threading.Thread(target=later).start()
    t = time.monotonic()
    got = backend.lease(1, 30, wait=5)
    assert [lease.task_id for lease in got] == ["j1-0"]
    assert time.monotonic() - t < 2.5
