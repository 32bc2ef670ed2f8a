"""The storage contract (nbqueue/backends/base.py), run unchanged against every backend."""

from __future__ import annotations

import threading
import time

import pytest

from nbqueue.backends.base import TaskStatus
from nbqueue.ids import job_of

from .helpers import tasks_of


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
    assert (c.queued, c.scheduled, c.leased, c.failed) == (0, 1, 0, 1)  # waiting out its backoff
    assert backend.job_counts("j1").scheduled == 1
    assert backend.lease(1, 30) == []  # not ready yet
    time.sleep(0.6)
    c = backend.counts()
    assert (c.queued, c.scheduled) == (1, 0)
    (again,) = backend.lease(1, 30)
    assert again.task_id == lease.task_id and again.attempt == 2


def test_insert_with_a_delay_queues_tasks_that_are_ready_only_when_due(backend, backend_factory):
    backend.insert("j1", tasks_of("j1", 2), delay=0.6)
    backend.insert("j2", tasks_of("j2", 1))
    c = backend.counts()
    assert (c.inserted, c.queued, c.scheduled, c.leased) == (3, 1, 2, 0)
    j1, j2 = backend.job_counts("j1"), backend.job_counts("j2")
    assert (j1.queued, j1.scheduled, j2.queued, j2.scheduled) == (0, 2, 1, 0)
    assert [lease.task_id for lease in backend.lease(10, 30)] == ["j2-0"]  # the delayed wait
    assert backend.lease(10, 30) == []
    # A blocked lease (a waiting worker) wakes for them when they come due.
    t = time.monotonic()
    leased = backend_factory().lease(10, 30, wait=3.0)
    leased += backend.lease(10, 30)
    assert sorted(lease.task_id for lease in leased) == ["j1-0", "j1-1"]
    assert 0.3 < time.monotonic() - t < 2.5
    assert all(lease.attempt == 1 for lease in leased)


def test_jobs_take_turns_and_a_higher_priority_goes_first(backend, backend_factory):
    big = tasks_of("j1", 100)
    for start in range(0, 100, 25):  # inserted in batches, as an insert writes them
        backend.insert("j1", big[start : start + 25])
    backend.insert("j2", tasks_of("j2", 3))
    first = backend.lease(5, 30)
    assert [job_of(lease.task_id) for lease in first] == ["j1"] * 5
    second = backend.lease(5, 30)  # j2's turn: all of it, then j1's again
    assert sorted(job_of(lease.task_id) for lease in second) == ["j1", "j1", "j2", "j2", "j2"]
    backend.insert("j3", tasks_of("j3", 2), priority=5)
    third = backend_factory().lease(4, 30)  # another worker
    assert [job_of(lease.task_id) for lease in third][:2] == ["j3", "j3"]
    assert backend.counts().queued == 100 - 5 - 2 - 2 and backend.counts().leased == 14
    # A task given back rejoins its job's turn; nothing is lost or handed out twice.
    assert backend.release(third[0].task_id, third[0].token)
    time.sleep(0.3)  # an fq:// worker sees a change to queue/ at its next listing (0.25 s)
    rest = []
    while batch := backend.lease(50, 30):
        rest += batch
    assert rest[0].task_id == third[0].task_id  # j3 still has the highest priority
    leased = [lease.task_id for lease in first + second + third[1:] + rest]
    assert sorted(leased) == sorted(t for t, _ in big + tasks_of("j2", 3) + tasks_of("j3", 2))


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
    # An operator's release is not a crash: no attempt spent, no suspect made.
    assert [(lease.attempt, lease.suspect) for lease in backend.lease(3, 30)] == [(1, False)] * 3


def test_an_expiry_makes_a_suspect_whose_first_death_is_not_charged(backend):
    """Lease.suspect: the first expiry keeps the run count (a re-run sees attempt 2) but is not
    charged; the mark stays through releases and retries, and every later expiry is charged."""
    backend.insert("j1", tasks_of("j1", 2))
    first = backend.lease(2, 0.3)
    assert [(lease.attempt, lease.suspect, lease.charged) for lease in first] == [(1, False, 1)] * 2
    time.sleep(0.5)
    assert backend.release_all() == 2  # reclaims the expired leases
    again = sorted(backend.lease(2, 30), key=lambda lease: lease.task_id)
    assert [(lease.attempt, lease.suspect, lease.charged) for lease in again] == [(2, True, 1)] * 2
    assert backend.release(again[0].task_id, again[0].token) is True  # a release keeps the mark
    assert backend.fail(again[1].task_id, again[1].token, b"boom", 0.01) == TaskStatus.QUEUED
    time.sleep(0.1)
    kept = sorted(backend.lease(2, 0.3), key=lambda lease: lease.task_id)
    assert [(lease.attempt, lease.suspect, lease.charged) for lease in kept] == [(2, True, 1), (3, True, 2)]
    time.sleep(0.5)  # a suspect's expiry is charged
    last = sorted(backend.lease(2, 30), key=lambda lease: lease.task_id)
    assert [(lease.attempt, lease.charged) for lease in last] == [(3, 2), (4, 3)]
    assert backend.complete([(lease.task_id, lease.token, b"done") for lease in last]) == [True, True]


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
        ("inserted", "queued", "leased", "completed", "failed", "dead", "cancelled", "scheduled"), 0
    )
    assert backend.lease(10, 30) == [] and backend.list_jobs() == []


def test_queue_id_is_shared_by_every_handle_and_renewed_by_purge(backend, backend_factory):
    first = backend.queue_id()
    assert len(first) >= 16 and first == backend.queue_id() == backend_factory().queue_id()
    backend.insert("j1", tasks_of("j1", 2))
    assert backend.queue_id() == first  # use does not change it
    backend.purge()
    renewed = backend.queue_id()
    assert renewed != first and backend_factory().queue_id() == renewed


def test_an_insert_fenced_with_a_stale_queue_id_writes_nothing(backend, backend_factory):
    from nbqueue import QueueIdentityChanged, QueueStateLost

    first = backend.queue_id()
    backend.insert("j1", tasks_of("j1", 2), queue_id=first, record=b"rec1")
    assert backend.counts().queued == 2 and backend.get_job("j1") == b"rec1"
    backend_factory().purge()  # another process purges: the queue's identity changes
    for tasks, record in ((tasks_of("j2", 3), b"rec2"), ([], b"rec2")):
        with pytest.raises(QueueIdentityChanged, match="identity changed.*nothing was written") as caught:
            backend.insert("j2", tasks, queue_id=first, record=record)
        assert isinstance(caught.value, QueueStateLost) and caught.value.current != first
    assert backend.counts().queued == 0 and backend.list_jobs() == [] and backend.get_job("j2") is None
    renewed = backend.queue_id()
    backend.insert("j2", tasks_of("j2", 3), queue_id=renewed, record=b"rec2")
    assert backend.counts().queued == 3 and backend.get_job("j2") == b"rec2"
    with pytest.raises(QueueIdentityChanged) as caught:
        backend.insert("j3", tasks_of("j3", 1), queue_id="f" * 32)
    assert caught.value.current == renewed and backend.counts().queued == 3


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


# -- inspection, workers and copying ---------------------------------------------------------------
def test_peek_queued_shows_the_next_tasks_without_leasing(backend):
    assert backend.peek_queued(3) == []
    backend.insert("j1", tasks_of("j1", 4))
    (lease,) = backend.lease(1, 30)
    peeked = backend.peek_queued(2)
    assert len(peeked) == 2 and lease.task_id not in dict(peeked)
    assert all(payload == f"payload {task_id[-1]}".encode() for task_id, payload in peeked)
    assert backend.counts().queued == 3 and len(backend.peek_queued(10)) == 3
    assert backend.fail(lease.task_id, lease.token, b"e", 30) == TaskStatus.QUEUED
    assert lease.task_id not in dict(backend.peek_queued(10))  # a delayed retry is not ready


def test_lease_deadlines_are_soonest_first_on_the_backends_clock(backend):
    assert backend.lease_deadlines(5) == []
    backend.insert("j1", tasks_of("j1", 3))
    (long,) = backend.lease(1, 60)
    (short,) = backend.lease(1, 10)
    (expired,) = backend.lease(1, 0.1)
    time.sleep(0.2)
    deadlines = backend.lease_deadlines(5)
    assert [task_id for task_id, _ in deadlines] == [expired.task_id, short.task_id, long.task_id]
    seconds = [left for _, left in deadlines]
    assert seconds[0] < 0 < 9 < seconds[1] <= 10 and 59 < seconds[2] <= 60
    assert [task_id for task_id, _ in backend.lease_deadlines(1)] == [expired.task_id]


def test_find_task_follows_a_task_through_its_states(backend):
    assert backend.find_task("j1-0") is None
    backend.insert("j1", tasks_of("j1", 3))
    info = backend.find_task("j1-1")
    assert (info.status, info.attempts, info.payload, info.expires_in) == (
        TaskStatus.QUEUED,
        0,
        b"payload 1",
        None,
    )
    leases = {lease.task_id: lease for lease in backend.lease(3, 30)}
    info = backend.find_task("j1-1")
    assert (info.status, info.attempts, info.payload) == (TaskStatus.LEASED, 1, b"payload 1")
    assert 29 < info.expires_in <= 30
    backend.fail("j1-1", leases["j1-1"].token, b"retry", 30)
    assert (backend.find_task("j1-1").status, backend.find_task("j1-1").attempts) == (TaskStatus.QUEUED, 1)
    backend.complete([("j1-0", leases["j1-0"].token, b"r")])
    info = backend.find_task("j1-0")
    assert (info.status, info.payload) == (TaskStatus.COMPLETED, None)
    backend.fail("j1-2", leases["j1-2"].token, b"err", None)
    info = backend.find_task("j1-2")
    assert (info.status, info.attempts, info.payload) == (TaskStatus.DEAD, 1, b"payload 2")
    assert backend.find_task("j1-9") is None and backend.find_task("j2-0") is None


def test_heartbeats_expire_and_can_be_withdrawn(backend):
    assert backend.workers() == {}
    backend.heartbeat("host-a:1", b"info a", 30)
    backend.heartbeat("host.b:2", b"info b", 0.2)
    assert backend.workers() == {"host-a:1": b"info a", "host.b:2": b"info b"}
    backend.heartbeat("host-a:1", b"info a2", 30)
    time.sleep(0.4)
    assert backend.workers() == {"host-a:1": b"info a2"}
    backend.heartbeat("host-a:1", b"", 0)
    assert backend.workers() == {}
    with pytest.raises(ValueError):
        backend.heartbeat("../evil", b"", 30)


def test_iter_leased_and_iter_functions(backend):
    backend.put_function("ab" * 32, b"blob a")
    backend.put_function("cd" * 32, b"blob c")
    assert sorted(backend.iter_functions()) == [("ab" * 32, b"blob a"), ("cd" * 32, b"blob c")]
    backend.insert("j1", tasks_of("j1", 3))
    leased = {lease.task_id for lease in backend.lease(2, 30)}
    assert {task_id for task_id, _ in backend.iter_leased()} == leased
    assert {task_id for task_id, _ in backend.iter_queued()} == {"j1-0", "j1-1", "j1-2"} - leased


def test_put_results_counts_completed_and_refuses_repeats(backend):
    backend.put_results("j1", [("j1-0", b"r0"), ("j1-1", b"r1")])
    assert backend.results("j1") == {"j1-0": b"r0", "j1-1": b"r1"}
    jc, c = backend.job_counts("j1"), backend.counts()
    assert (jc.inserted, jc.completed, jc.queued, jc.failed) == (2, 2, 0, 0)
    assert (c.inserted, c.completed) == (2, 2)
    assert backend.find_task("j1-1").status == TaskStatus.COMPLETED
    with pytest.raises(ValueError):
        backend.put_results("j1", [("j1-2", b"r2"), ("j1-0", b"again")])
    with pytest.raises(ValueError):
        backend.put_results("j1", [("j2-0", b"foreign")])
    assert backend.results("j1") == {"j1-0": b"r0", "j1-1": b"r1"}
    assert backend.counts().completed == 2


def test_put_dead_restores_letters_that_redrive(backend):
    from nbqueue.backends.base import DeadLetter

    backend.put_dead("j1", [DeadLetter("j1-0", 3, b"payload 0", b"err 0")])
    assert [(d.task_id, d.attempts, d.payload, d.error) for d in backend.dead()] == [
        ("j1-0", 3, b"payload 0", b"err 0")
    ]
    assert backend.results("j1") == {"j1-0": b"err 0"}
    jc = backend.job_counts("j1")
    assert (jc.inserted, jc.dead, backend.counts().dead) == (1, 1, 1)
    with pytest.raises(ValueError):
        backend.put_dead("j1", [DeadLetter("j1-0", 1, b"x", b"again")])
    with pytest.raises(ValueError):
        backend.put_dead("j1", [DeadLetter("j1-1", 1, b"x", None)])
    assert backend.redrive() == 1
    (lease,) = backend.lease(1, 30)
    assert (lease.task_id, lease.attempt, lease.payload) == ("j1-0", 1, b"payload 0")


def test_cancel_ends_waiting_tasks_and_marks_leased_ones(backend):
    backend.insert("j1", tasks_of("j1", 4))
    backend.insert("j1", [("j1-4", b"payload 4")], delay=30)  # scheduled
    backend.insert("j2", tasks_of("j2", 2))
    (held,) = backend.lease(1, 30)  # jobs take turns: j1 first
    assert held.task_id.startswith("j1-")
    assert backend.cancel("j1", b"cancelled") == 4  # three queued and the scheduled one
    c = backend.job_counts("j1")
    assert (c.queued, c.scheduled, c.leased, c.cancelled, c.failed) == (0, 0, 1, 4, 0)
    assert c.finished == 4
    assert backend.cancel_requested([held.task_id, "j2-0"]) == {held.task_id}
    assert sorted(backend.results("j1")) == sorted(f"j1-{i}" for i in range(5) if f"j1-{i}" != held.task_id)
    assert set(backend.results("j1").values()) == {b"cancelled"}
    # The running task raised Cancelled: its failure ends it cancelled, never retried or dead.
    assert backend.fail(held.task_id, held.token, b"its error", 0.0) == TaskStatus.CANCELLED
    c = backend.job_counts("j1")
    assert (c.leased, c.cancelled, c.failed, c.dead, c.finished) == (0, 5, 0, 0, 5)
    assert backend.results("j1")[held.task_id] == b"cancelled"
    assert backend.find_task(held.task_id).status == TaskStatus.CANCELLED
    # The other job is untouched.
    assert sorted(lease.task_id for lease in backend.lease(10, 30)) == ["j2-0", "j2-1"]
    q = backend.counts()
    assert (q.cancelled, q.leased, q.queued) == (5, 2, 0)


def test_a_cancelled_task_never_goes_back_to_the_queue(backend):
    backend.insert("j1", tasks_of("j1", 3))
    a, b, c = sorted(backend.lease(3, 0.3), key=lambda lease: lease.task_id)
    assert backend.cancel("j1", b"cancelled") == 0  # all three are leased: marked only
    assert backend.release(a.task_id, a.token) is True  # given back unstarted
    assert backend.complete([(b.task_id, b.token, b"finished first")]) == [True]  # a value is kept
    time.sleep(0.5)  # c's lease expires (its worker died)
    assert backend.lease(10, 30) == []  # a lease reclaims the expired one: it ends cancelled
    counts = backend.job_counts("j1")
    assert (counts.queued, counts.leased, counts.completed, counts.cancelled) == (0, 0, 1, 2)
    assert backend.results("j1") == {"j1-0": b"cancelled", "j1-1": b"finished first", "j1-2": b"cancelled"}
    assert backend.find_task("j1-1").status == TaskStatus.COMPLETED


def test_cancel_one_task_leaves_the_rest_of_its_job(backend):
    backend.insert("j1", tasks_of("j1", 5))
    assert backend.cancel("j1", b"cancelled", ["j1-1", "j1-3"]) == 2
    leased = backend.lease(10, 30)
    assert sorted(lease.task_id for lease in leased) == ["j1-0", "j1-2", "j1-4"]
    counts = backend.job_counts("j1")
    assert (counts.cancelled, counts.leased, counts.queued) == (2, 3, 0)
    assert backend.cancel("j1", b"cancelled", ["j1-4"]) == 0  # leased: marked only
    assert backend.cancel_requested([lease.task_id for lease in leased]) == {"j1-4"}
    with pytest.raises(ValueError):
        backend.cancel("j1", b"cancelled", ["j2-0"])  # another job's task: nothing changes
    assert backend.job_counts("j1").cancelled == 2


def test_cancel_of_a_finished_job_changes_nothing(backend):
    backend.insert("j1", tasks_of("j1", 1))
    (lease,) = backend.lease(1, 30)
    assert backend.complete([(lease.task_id, lease.token, b"done")]) == [True]
    assert backend.cancel("j1", b"cancelled") == 0
    counts = backend.job_counts("j1")
    assert (counts.completed, counts.cancelled) == (1, 0)
    assert backend.results("j1") == {"j1-0": b"done"}
    assert backend.find_task("j1-0").status == TaskStatus.COMPLETED


def test_retry_queues_dead_and_cancelled_tasks_again_under_their_ids(backend):
    backend.insert("j1", tasks_of("j1", 4))
    leases = sorted(backend.lease(2, 30), key=lambda lease: lease.task_id)  # j1-0, j1-1
    assert backend.fail(leases[0].task_id, leases[0].token, b"its error", None) == TaskStatus.DEAD
    assert backend.complete([(leases[1].task_id, leases[1].token, b"value")]) == [True]
    assert backend.cancel("j1", b"cancelled") == 2  # j1-2, j1-3
    assert backend.failed_payloads("j1") == {"j1-0": b"payload 0", "j1-2": b"payload 2", "j1-3": b"payload 3"}
    with pytest.raises(ValueError, match="cannot be retried"):
        backend.retry("j1", [("j1-1", b"new 1"), ("j1-0", b"new 0")])  # j1-1 completed
    assert backend.job_counts("j1").dead == 1  # nothing changed
    assert backend.retry("j1", [("j1-0", b"new 0"), ("j1-2", b"new 2"), ("j1-3", b"new 3")]) == 3
    counts = backend.job_counts("j1")
    assert (counts.queued, counts.dead, counts.cancelled, counts.completed) == (3, 0, 0, 1)
    assert backend.counts().dead == 0 and backend.dead() == []
    assert backend.results("j1") == {"j1-1": b"value"}
    assert backend.failed_payloads("j1") == {}
    again = sorted(backend.lease(10, 30), key=lambda lease: lease.task_id)  # the cancel is lifted
    assert [(x.task_id, x.payload, x.attempt) for x in again] == [
        ("j1-0", b"new 0", 1),
        ("j1-2", b"new 2", 1),
        ("j1-3", b"new 3", 1),
    ]
    assert backend.complete([(x.task_id, x.token, b"fixed") for x in again]) == [True] * 3
    assert backend.job_counts("j1").completed == 4 and backend.job_counts("j1").finished == 4


# -- watching: the commit log ----------------------------------------------------------------------
def _commit(backend, job: str, n: int) -> None:
    for lease in sorted(backend.lease(n, 30), key=lambda lease: lease.task_id):
        assert backend.complete([(lease.task_id, lease.token, f"r{lease.task_id}".encode())]) == [True]


def test_a_commit_wakes_a_watch_at_once_and_a_quiet_watch_times_out(backend):
    backend.insert("j1", tasks_of("j1", 2))
    with backend.watch_commits("j1") as watch:
        t = time.monotonic()
        watch.wait(0.2)  # False; True only where the storage can merely poll (then: a short pause)
        assert time.monotonic() - t < 1.0  # a quiet wait ends by its timeout, not later
        woke = []
        waiter = threading.Thread(target=lambda: woke.append((watch.wait(10), time.monotonic())))
        # Drain whatever the timed-out wait left (a polling watch answers "maybe" each pause).
        while watch.wait(0.01):
            pass
        waiter.start()
        time.sleep(0.2)
        committed = time.monotonic()
        _commit(backend, "j1", 1)
        waiter.join(10)
        assert woke and woke[0][0] is True and woke[0][1] - committed < 0.5


def test_a_commit_before_the_wait_still_wakes_it(backend):
    backend.insert("j1", tasks_of("j1", 1))
    with backend.watch_commits("j1") as watch:
        _commit(backend, "j1", 1)  # between the watch and the wait: nothing is missed
        t = time.monotonic()
        assert watch.wait(5) is True and time.monotonic() - t < 1.0


def test_a_commit_before_the_watch_wakes_its_first_wait(backend):
    # What lets a waiter skip its first look: a task done before anyone watched still ends the wait.
    backend.insert("j1", tasks_of("j1", 2))
    _commit(backend, "j1", 1)
    with backend.watch_commits("j1") as watch:
        t = time.monotonic()
        assert watch.wait(5) is True and time.monotonic() - t < 1.0


def _wait_through_a_commit(backend, wait_then, arrived):
    """``wait_then(10)`` called in a thread as a waiter does (a polling watch may wake it early)
    until ``arrived(what it read)``, while the job's first task commits; the last ``(woke,
    read)`` and the seconds from the commit to its return."""
    found: list = []

    def wait_for_it() -> None:
        while not found or not arrived(found[-1][1]):
            found.append((*wait_then(10), time.monotonic()))

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.1)
    committed = time.monotonic()
    _commit(backend, "j1", 1)
    waiter.join(10)
    woke, read, when = found[-1]
    return woke, read, when - committed


def test_wait_then_read_returns_the_record_a_commit_brought(backend):
    backend.insert("j1", tasks_of("j1", 2))
    with backend.watch_commits("j1") as watch:
        assert watch.wait_then_read("j1-0", 0.05)[1] is None  # nothing yet: the wait times out
        woke, record, late = _wait_through_a_commit(
            backend, lambda t: watch.wait_then_read("j1-0", t), lambda record: record is not None
        )
        assert woke is True and record == b"rj1-0" and late < 0.5
        assert watch.wait_then_read("j1-1", 0.05)[1] is None  # another task of the job: not done


def test_wait_then_counts_returns_the_counters_a_commit_brought(backend):
    backend.insert("j1", tasks_of("j1", 2))
    with backend.watch_commits("j1") as watch:
        assert watch.wait_then_counts(0.05)[1].completed == 0  # nothing yet: the wait times out
        woke, counts, late = _wait_through_a_commit(
            backend, watch.wait_then_counts, lambda counts: counts.completed > 0
        )
        assert woke is True and late < 0.5
        assert (counts.completed, counts.leased, counts.queued) == (1, 0, 1)


def test_exact_counters_say_a_job_ended_the_moment_its_last_record_lands(backend):
    # A waiter trusts ``finished`` alone where the storage says its counters are exact.
    backend.insert("j1", tasks_of("j1", 3))
    (first, second, third) = backend.lease(3, 30)
    backend.complete([(first.task_id, first.token, b"r0")])
    backend.fail(second.task_id, second.token, b"e1", None)  # dead: it has a record too
    backend.cancel("j1", b"c", [third.task_id])  # a running task: told, it ends when it reports
    backend.fail(third.task_id, third.token, b"e2", None)
    counts = backend.job_counts("j1")
    assert backend.exact_job_finished("j1") == 3
    if backend.counts_exact:
        assert counts.finished == 3


def test_the_workers_that_ran_a_job_are_kept_with_it_until_a_purge(backend):
    backend.insert("j1", tasks_of("j1", 1))
    assert backend.job_workers("j1") == set()
    for worker in ("host-a:1", "host-a:1", "host-b:2"):
        backend.add_job_worker("j1", worker)
    assert backend.job_workers("j1") == {"host-a:1", "host-b:2"} and backend.job_workers("j2") == set()
    with pytest.raises(ValueError):
        backend.add_job_worker("j1", "../escape")
    backend.purge()
    assert backend.job_workers("j1") == set()


def test_read_commits_returns_each_record_once_from_a_cursor(backend):
    backend.insert("j1", tasks_of("j1", 5))
    _commit(backend, "j1", 2)
    got, cursor = backend.read_commits("j1", None, 100)
    assert dict(got) == {"j1-0": b"rj1-0", "j1-1": b"rj1-1"}
    assert backend.read_commits("j1", cursor, 100)[0] == []
    # The rest of the job: a failure for good and a cancel are commits too; another job's are not.
    done, failed = backend.lease(2, 30)
    backend.complete([(done.task_id, done.token, b"value")])
    backend.fail(failed.task_id, failed.token, b"err", None)
    backend.cancel("j1", b"cancelled", ["j1-4"])
    backend.insert("j2", tasks_of("j2", 1))
    _commit(backend, "j2", 1)
    seen = {}
    for _ in range(3):  # a small limit pages through them
        got, cursor = backend.read_commits("j1", cursor, 2)
        seen.update(got)
    assert seen == {done.task_id: b"value", failed.task_id: b"err", "j1-4": b"cancelled"}
    assert backend.read_commits("j1", cursor, 100)[0] == []
    assert backend.read_commits("unknown", None, 100)[0] == []


def test_record_reads_one_task(backend):
    backend.insert("j1", tasks_of("j1", 2))
    assert backend.record("j1-0") is None
    _commit(backend, "j1", 1)
    assert backend.record("j1-0") == b"rj1-0" and backend.record("j1-1") is None


def test_insert_with_the_job_record_stores_both(backend):
    backend.insert("j1", tasks_of("j1", 2), record=b'{"total": 2}')
    assert backend.get_job("j1") == b'{"total": 2}' and "j1" in backend.list_jobs()
    assert backend.counts().queued == 2
    # A refused batch (a repeated id) stores neither.
    with pytest.raises(ValueError):
        backend.insert("j2", tasks_of("j2", 1) * 2, record=b"{}")
    assert backend.get_job("j2") is None
