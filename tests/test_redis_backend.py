"""redis:// specifics the contract suite cannot see: URLs, keys, TTLs, ACLs, blocking, restarts."""

from __future__ import annotations

import functools
import gc
import shutil
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from nbqueue.backends import open_backend
from nbqueue.backends.base import TaskStatus
from nbqueue.backends.redis import QUEUE_KEYS, RedisBackend, parse_redis_url
from nbqueue.errors import BackendUnavailable, QueueURLError

from .helpers import start_workers, tasks_of, wait_all
from .redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]


def hash_tag(key: bytes) -> bytes:
    """The part of a key Redis Cluster hashes: between the first '{' and the next '}'."""
    start = key.index(b"{")
    return key[start + 1 : key.index(b"}", start)]


@pytest.fixture
def rb(redis_url):
    backend = open_backend(redis_url)
    yield backend
    backend.close()


@pytest.fixture
def raw(redis_server):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def acl_user(raw):
    """Makes ACL users on the private server limited to one queue's keys; deletes them after."""
    made = []

    def make(queue: str) -> tuple[str, str]:
        user, password = f"u_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
        raw.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", f"~nbq:{{{queue}}}:*", "+@all", "-@dangerous"
        )
        made.append(user)
        return user, password

    yield make
    for user in made:
        raw.execute_command("ACL", "DELUSER", user)


def exercise(b: RedisBackend) -> None:
    """Leave a queue with something in every structure: ready, delayed, leased, dead, results."""
    b.put_function("ab" * 32, b"fn")
    b.put_job("j1", b"meta")
    b.insert("j1", tasks_of("j1", 6))
    b.insert("j2", tasks_of("j2", 1))
    leases = sorted(b.lease(7, 30), key=lambda lease: lease.task_id)
    b.complete([(lease.task_id, lease.token, b"r") for lease in leases[:2]])
    assert b.fail(leases[2].task_id, leases[2].token, b"err", None) == TaskStatus.DEAD
    assert b.fail(leases[3].task_id, leases[3].token, b"err", 60) == TaskStatus.QUEUED
    assert b.release(leases[4].task_id, leases[4].token)


# -- URLs ---------------------------------------------------------------------------------------
def test_url_parts_and_redacted_password():
    parsed = parse_redis_url("redis://alice:s3cr%40t@db.example:6380/5?queue=scores.v2&result_ttl=60")
    assert parsed["queue"] == "scores.v2" and parsed["result_ttl"] == 60
    client = parsed["client"]
    assert (client["host"], client["port"], client["db"]) == ("db.example", 6380, 5)
    assert (client["username"], client["password"], client["ssl"]) == ("alice", "s3cr@t", False)
    assert parsed["redacted"] == "redis://alice:***@db.example:6380/5?queue=scores.v2&result_ttl=60"


def test_url_defaults_and_tls_options_pass_through():
    parsed = parse_redis_url("rediss://cache.example?ssl_cert_reqs=none&socket_timeout=20")
    client = parsed["client"]
    assert (
        parsed["queue"] == "default"
        and parsed["redacted"] == "rediss://cache.example?ssl_cert_reqs=none&socket_timeout=20"
    )
    assert (client["port"], client["db"], client["ssl"]) == (6379, 0, True)
    assert (client["ssl_cert_reqs"], client["socket_timeout"]) == ("none", 20.0)


@pytest.mark.parametrize(
    "url",
    [
        "redis://bob:pw98765@h/0?queue=a{b}",
        "redis://bob:pw98765@h/0?queue=",
        "redis://bob:pw98765@h/x?queue=a",
        "redis://bob:pw98765@h/0?queue=a&bogus=1",
        "redis://bob:pw98765@h:99999999/0",
        "redis://bob:pw98765@h/0?result_ttl=-5",
        "redis://bob:pw98765@h/0?socket_timeout=soon",
        "redis://bob:pw98765@h/0?socket_timeout=0",
    ],
)
def test_bad_urls_raise_queue_url_error_without_the_password(url):
    with pytest.raises(QueueURLError) as info:
        open_backend(url)
    assert "pw98765" not in str(info.value) and "***" in str(info.value)


def test_backend_url_hides_the_password(redis_server, acl_user):
    queue = uuid.uuid4().hex
    user, password = acl_user(queue)
    with open_backend(redis_server.url(queue, userinfo=f"{user}:{password}@")) as b:
        assert b.url == redis_server.url(queue, userinfo=f"{user}:***@")
        assert password not in repr(b)


# -- keys and expiry ----------------------------------------------------------------------------
def test_every_key_of_a_queue_shares_one_hash_tag_and_purge_deletes_them_all(redis_server):
    db = redis_server.client(db=3)
    try:
        db.flushdb()
        with open_backend(redis_server.url("tagged", db=3)) as b:
            exercise(b)
            keys = set(db.scan_iter(count=1000))
            assert {hash_tag(k) for k in keys} == {b"tagged"}
            kinds = {k.decode().split(":")[2] for k in keys}
            assert {"ready", "delayed", "leases", "payload", "dead", "jc", "results", "job", "fn"} <= kinds
            b.purge()
            assert list(db.scan_iter(count=1000)) == []
            assert b.list_jobs() == [] and b.dead() == [] and b.counts().inserted == 0
    finally:
        db.close()


def test_finished_jobs_expire_and_queue_structures_never_do(redis_server, raw):
    with open_backend(redis_server.url(uuid.uuid4().hex) + "&result_ttl=120") as b:
        b.put_function("cd" * 32, b"fn")
        b.put_job("j1", b"meta")
        b.insert("j1", tasks_of("j1", 2))
        first, second = b.lease(2, 30)
        b.complete([(first.task_id, first.token, b"r")])
        job_keys = [b.key(kind, "j1") for kind in ("jc", "results", "job")]
        assert [raw.ttl(k) for k in job_keys] == [-1, -1, -1]  # the job still has a task leased
        b.complete([(second.task_id, second.token, b"r")])
        assert all(0 < raw.ttl(k) <= 120 for k in job_keys)
        exercise(b)
        queue_keys = [b.key(name) for name in QUEUE_KEYS if raw.exists(b.key(name))]
        assert len(queue_keys) > 10 and {raw.ttl(k) for k in queue_keys} == {-1}
        assert raw.ttl(b.key("fn", "cd" * 32)) == -1


def test_a_finished_job_given_more_tasks_keeps_its_keys_until_it_ends_again(redis_server, raw):
    # The scripts skip the per-key PERSIST while a job stays live (or is new): this is the case
    # that still needs it, a job that had expiring keys and is live again.
    with open_backend(redis_server.url(uuid.uuid4().hex) + "&result_ttl=120") as b:
        job_keys = [b.key(kind, "j1") for kind in ("jc", "results", "log", "job")]

        def ttls() -> list[int]:
            return [raw.ttl(k) for k in job_keys]

        def run_all() -> None:
            leases = b.lease(10, 30)
            assert set(ttls()) <= {-1, -2}  # leased, so live: no TTL (-2: not made yet)
            b.complete([(lease.task_id, lease.token, b"r") for lease in leases])

        b.insert("j1", tasks_of("j1", 2), record=b"meta")
        assert raw.ttl(b.key("jc", "j1")) == -1 and raw.ttl(b.key("job", "j1")) == -1
        run_all()
        assert all(0 < ttl <= 120 for ttl in ttls())
        b.insert("j1", tasks_of("j1", 1, start=2))  # a second batch after the first ended
        assert ttls() == [-1, -1, -1, -1]
        run_all()
        assert all(0 < ttl <= 120 for ttl in ttls())
        assert b.job_counts("j1").completed == 3


def test_list_jobs_keeps_a_job_indexed_while_any_key_of_it_lives(rb, raw):
    # A job new to the index is taken to have no keys (the scripts skip PERSIST for it), so the
    # index must not drop a job while a key of it is left to expire.
    rb.insert("ja", tasks_of("ja", 1), record=b"a")
    (lease,) = rb.lease(1, 30)
    rb.complete([(lease.task_id, lease.token, b"r")])
    raw.delete(rb.key("job", "ja"), rb.key("jc", "ja"), rb.key("results", "ja"))
    assert rb.list_jobs() == [] and raw.zrange(rb.key("jobs"), 0, -1) == [b"ja"]  # its log is left
    raw.delete(rb.key("log", "ja"))
    assert rb.list_jobs() == [] and raw.zrange(rb.key("jobs"), 0, -1) == []


def run_one(b: RedisBackend, job: str) -> None:
    """Insert, lease and complete the one task of ``job``, its record ``b"r"``."""
    b.insert(job, tasks_of(job, 1))
    (lease,) = b.lease(1, 30)
    b.complete([(lease.task_id, lease.token, b"r")])


def primed_connections(raw) -> list[dict]:
    """The server's clients blocked in a primed read (an XREAD from a log's start)."""
    return [c for c in raw.client_list() if c.get("cmd") == "xread" and c.get("flags") == "b"]


def test_a_primed_watch_is_answered_by_the_commit_of_its_task(rb, raw):
    watch = rb.primed_watch("j1", "j1-0")  # before the insert, as a submit asks
    assert watch is not None and primed_connections(raw) == []
    rb.insert("j1", tasks_of("j1", 1))  # the read goes out with it
    assert len(primed_connections(raw)) == 1
    (lease,) = rb.lease(1, 30)
    start = time.monotonic()
    assert watch.wait_then_read("j1-0", 0.1) == (False, None)  # not committed: waits the timeout
    assert time.monotonic() - start < 1.0
    rb.complete([(lease.task_id, lease.token, b"r")])
    assert watch.wait_then_read("j1-0", 5) == (True, b"r")
    assert primed_connections(raw) == []
    watch.close()


def test_a_submit_sends_its_handles_first_wait_with_its_insert(redis_url, raw, monkeypatch):
    # Through the public API: the read is out before any get, and get takes its answer (the
    # fallback would wait as well, so this is what shows the submit primed at all).
    import nbqueue
    from nbqueue import handles

    from .helpers import notebook

    monkeypatch.setattr(handles, "_default", None)
    nb = notebook("from nbqueue import queueable\n@queueable\ndef double(x):\n    return 2 * x\n")
    tq = nbqueue.use(redis_url)
    handle = nb.double.submit(21)
    assert len(primed_connections(raw)) == 1
    procs = start_workers(redis_url, 1, "--burst")
    assert handle.get(timeout=60) == 42 and primed_connections(raw) == []
    assert wait_all(procs, timeout=60) == [0]
    tq.backend.close()


def test_a_one_task_jobs_wait_takes_the_read_primed_with_its_insert(redis_url, raw):
    # insert([task]) primes as a submit does; the job's own wait() takes the read (it used to
    # hold a connection until another prime freed it), and its counters come after the answer.
    import nbqueue

    from .helpers import notebook

    nb = notebook("from nbqueue import queueable\n@queueable\ndef double(x):\n    return 2 * x\n")
    tq = nbqueue.TaskQueue(redis_url)
    job = tq.insert([functools.partial(nb.double, 4)], progress=False)
    assert len(primed_connections(raw)) == 1 and job.first_task_watch is not None
    procs = start_workers(redis_url, 1, "--burst")
    assert job.wait(timeout=60, progress=False).results() == [8]
    assert job.first_task_watch is None and primed_connections(raw) == []
    assert wait_all(procs, timeout=60) == [0]
    tq.backend.close()


def test_a_primed_watchs_counts_wait_for_the_commit(rb):
    watch = rb.primed_watch("j1", "j1-0")
    rb.insert("j1", tasks_of("j1", 1))
    (lease,) = rb.lease(1, 30)
    woke, counts = watch.wait_then_counts(0.1)
    assert not woke and counts.leased == 1
    rb.complete([(lease.task_id, lease.token, b"r")])
    woke, counts = watch.wait_then_counts(5)
    assert woke and counts.completed == 1
    watch.close()


def test_primed_reads_are_few_and_give_their_connections_back(rb, raw):
    # A loop of submits whose handles wait later must not hold a connection per task.
    watches = [rb.primed_watch(f"j{i}", f"j{i}-0") for i in range(8)]
    primed = [i for i, w in enumerate(watches) if w is not None]
    assert 0 < len(primed) < 8
    for i in range(8):
        rb.insert(f"j{i}", tasks_of(f"j{i}", 1))
    assert len(primed_connections(raw)) == len(primed)
    for lease in rb.lease(8, 30):
        rb.complete([(lease.task_id, lease.token, b"r")])
    later = rb.primed_watch("jx", "jx-0")  # the answered reads were taken in and freed
    assert later is not None
    for i in primed:  # each keeps the answer taken in for it
        assert watches[i].wait_then_read(f"j{i}-0", 0.1) == (True, b"r")
    rb.insert("jx", tasks_of("jx", 1))
    assert len(primed_connections(raw)) == 1
    del watches, later
    gc.collect()  # a watch dropped unanswered closes its connection
    deadline = time.monotonic() + 5
    while primed_connections(raw) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert primed_connections(raw) == []


def test_a_watch_whose_primed_connection_was_killed_still_sees_its_task(rb, raw):
    watch = rb.primed_watch("j1", "j1-0")
    assert watch is not None
    rb.insert("j1", tasks_of("j1", 1))
    (blocked,) = primed_connections(raw)
    raw.client_kill_filter(_id=blocked["id"])
    (lease,) = rb.lease(1, 30)
    rb.complete([(lease.task_id, lease.token, b"r")])
    assert watch.wait_then_read("j1-0", 5) == (True, b"r")  # read the usual way instead
    watch.close()


def test_an_insert_refused_with_a_primed_read_keeps_nothing_and_the_read_is_freed(rb, raw):
    rb.insert("j1", tasks_of("j1", 1))
    watch = rb.primed_watch("j1", "j1-1")
    assert watch is not None
    with pytest.raises(ValueError, match="already exists"):
        rb.insert("j1", tasks_of("j1", 2))  # refused whole: j1-0 is queued already
    assert len(primed_connections(raw)) == 1
    watch.close()  # as the insert's caller does on an error
    assert primed_connections(raw) == []
    assert rb.job_counts("j1").inserted == 1


def test_list_jobs_forgets_jobs_whose_keys_expired(rb, raw):
    rb.put_job("ja", b"a")
    rb.put_job("jb", b"b")
    raw.delete(rb.key("job", "ja"))  # as if its TTL ran out
    assert rb.list_jobs() == ["jb"]
    assert raw.zrange(rb.key("jobs"), 0, -1) == [b"jb"]


def test_exact_job_finished_counts_result_records(rb):
    rb.insert("j1", tasks_of("j1", 3))
    leases = rb.lease(3, 30)
    rb.complete([(lease.task_id, lease.token, b"r") for lease in leases[:2]])
    assert rb.exact_job_finished("j1") == 2


# -- insert, dead letters, admin ----------------------------------------------------------------
def test_duplicate_task_ids_insert_nothing(rb):
    rb.insert("j1", tasks_of("j1", 2))
    with pytest.raises(ValueError, match="j1-1"):
        rb.insert("j1", [("j1-2", b"x"), ("j1-1", b"y")])
    with pytest.raises(ValueError, match="twice"):
        rb.insert("j1", [("j1-5", b"x"), ("j1-5", b"y")])
    c = rb.counts()
    assert (c.inserted, c.queued) == (2, 2)
    assert sorted(t for t, _ in rb.iter_queued()) == ["j1-0", "j1-1"]


def test_a_retried_insert_call_is_applied_once(rb):
    # What redis-py's retry does when a reply is lost: the same call, same nonce, again.
    args = ("j1", "nonce-1", "", 0, b"", "", "j1-0", b"p")  # no delay, priority 0, record, fence
    rb._run("insert", *args)
    rb._run("insert", *args)
    assert rb.counts().inserted == 1 and len(rb.lease(5, 30)) == 1


def test_dead_letter_keeps_payload_and_attempts(rb):
    rb.insert("j1", tasks_of("j1", 1))
    (lease,) = rb.lease(1, 30)
    rb.fail(lease.task_id, lease.token, b"e1", 0)
    (lease,) = rb.lease(1, 30)
    rb.fail(lease.task_id, lease.token, b"e2", None)
    (letter,) = rb.dead()
    assert (letter.task_id, letter.attempts, letter.payload, letter.error) == ("j1-0", 2, b"payload 0", b"e2")


def test_iter_queued_includes_delayed_retries(rb):
    rb.insert("j1", tasks_of("j1", 3))
    a, _ = rb.lease(2, 30)
    rb.fail(a.task_id, a.token, b"e", 60)
    assert len(dict(rb.iter_queued())) == 2


def test_rezero_recounts_state_counters_from_the_structures(rb, raw):
    rb.insert("j1", tasks_of("j1", 5))
    a, b = rb.lease(2, 30)
    rb.fail(a.task_id, a.token, b"e", None)
    raw.hset(rb.key("counts"), mapping={"queued": 99, "leased": -4, "dead": 7})
    c = rb.rezero()
    assert (c.inserted, c.queued, c.leased, c.dead, c.failed) == (0, 3, 1, 1, 0)
    assert rb.job_counts("j1").inserted == 0


def test_scripts_reload_after_script_flush(rb, raw):
    rb.insert("j1", tasks_of("j1", 2))
    raw.script_flush()
    (lease,) = rb.lease(1, 30)
    raw.script_flush()
    assert rb.complete([(lease.task_id, lease.token, b"r")]) == [True]
    assert rb.counts().completed == 1
    raw.script_flush()  # a job's waiter reads the counters with its wait, in one pipeline
    with rb.watch_commits("j1") as watch:
        woke, counts = watch.wait_then_counts(5)
    assert woke and (counts.completed, counts.queued) == (1, 1)


# -- blocking lease -----------------------------------------------------------------------------
def test_a_blocked_lease_gets_its_task_after_the_server_forgot_its_scripts(rb, raw, redis_url):
    # The blocked lease sends BLPOP and the lease script together; the script's EVALSHA then
    # meets a server without it (NOSCRIPT) and the lease must still come back with the task.
    other = open_backend(redis_url)
    got: list = []
    waiter = threading.Thread(target=lambda: got.extend(rb.lease(1, 30, wait=5)))
    waiter.start()
    time.sleep(0.3)
    raw.script_flush()
    start = time.monotonic()
    other.insert("j1", tasks_of("j1", 1))
    waiter.join()
    assert [lease.task_id for lease in got] == ["j1-0"] and time.monotonic() - start < 1.5
    other.close()


def test_blocked_lease_wakes_when_a_retry_becomes_due(rb):
    rb.insert("j1", tasks_of("j1", 1))
    (lease,) = rb.lease(1, 30)
    rb.fail(lease.task_id, lease.token, b"e", 0.4)
    t = time.monotonic()
    (again,) = rb.lease(1, 30, wait=5)
    assert again.task_id == "j1-0" and 0.3 < time.monotonic() - t < 1.5


def test_blocked_lease_wakes_when_a_lease_expires(rb):
    rb.insert("j1", tasks_of("j1", 1))
    rb.lease(1, 0.4)
    t = time.monotonic()
    (again,) = rb.lease(1, 30, wait=5)
    assert again.attempt == 2 and time.monotonic() - t < 1.5


def test_one_insert_wakes_every_waiter_it_has_work_for(rb, redis_url):
    got: list[str] = []
    others = [open_backend(redis_url) for _ in range(4)]

    def wait_for_one(b: RedisBackend) -> None:
        got.extend(lease.task_id for lease in b.lease(1, 30, wait=5))

    threads = [threading.Thread(target=wait_for_one, args=(b,)) for b in others]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start = time.monotonic()
    rb.insert("j1", tasks_of("j1", 4))
    for t in threads:
        t.join()
    assert sorted(got) == [f"j1-{i}" for i in range(4)] and time.monotonic() - start < 1.5
    for b in others:
        b.close()


def test_a_blocked_lease_does_not_hold_up_other_calls_on_the_same_object(rb):
    got = []
    waiter = threading.Thread(target=lambda: got.extend(rb.lease(1, 30, wait=3)))
    waiter.start()
    time.sleep(0.2)
    t = time.monotonic()
    assert rb.counts().queued == 0
    rb.insert("j1", tasks_of("j1", 1))
    assert time.monotonic() - t < 0.5
    waiter.join()
    assert [lease.task_id for lease in got] == ["j1-0"]


def test_wakeup_list_stays_bounded_and_empties_with_the_queue(rb, raw):
    rb.insert("j1", tasks_of("j1", 300))
    assert 0 < raw.llen(rb.key("notify")) <= 64
    while rb.lease(100, 30):
        pass
    assert raw.exists(rb.key("notify")) == 0


# -- connections, credentials, server trouble --------------------------------------------------
def test_missing_server_fails_fast_with_one_line_without_the_password():
    port = free_port()
    t = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        open_backend(f"redis://bob:hunter2pw@127.0.0.1:{port}/0?queue=q")
    assert time.monotonic() - t < 10
    message = str(info.value)
    assert "\n" not in message and "hunter2pw" not in message
    assert f"redis://bob:***@127.0.0.1:{port}/0" in message
    assert isinstance(info.value, ConnectionError)


def test_acl_user_limited_to_its_queue_keys_works(redis_server, acl_user):
    queue = uuid.uuid4().hex
    user, password = acl_user(queue)
    # CONFIG is denied to this user: the maxmemory-policy check is skipped without a word.
    with open_backend(redis_server.url(queue, userinfo=f"{user}:{password}@")) as b:
        exercise(b)
        assert b.list_jobs() == ["j1"] and len(b.dead()) == 1 and len(dict(b.iter_queued())) == 2
        b.purge()
        assert b.counts().inserted == 0
        producer = threading.Timer(0.2, b.insert, ("j3", tasks_of("j3", 1)))
        producer.start()
        assert [lease.task_id for lease in b.lease(5, 30, wait=3)] == ["j3-0"]
        producer.join()
    with open_backend(redis_server.url("someone-else", userinfo=f"{user}:{password}@")) as other:
        with pytest.raises(BackendUnavailable, match="permission") as info:
            other.insert("j1", tasks_of("j1", 1))
        assert password not in str(info.value)


def test_wrong_password_is_a_clear_error_without_the_password(redis_server, acl_user):
    queue = uuid.uuid4().hex
    user, _ = acl_user(queue)
    with pytest.raises(BackendUnavailable, match="credentials") as info:
        open_backend(redis_server.url(queue, userinfo=f"{user}:wrong-pw-123@"))
    assert "wrong-pw-123" not in str(info.value) and "\n" not in str(info.value)


def test_tasks_survive_a_killed_server_with_aof(tmp_path):
    server = RedisServer(tmp_path / "aof", ["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        with open_backend(server.url("durable")) as b:
            b.insert("j1", tasks_of("j1", 50))
            held = b.lease(10, 30)
            server.kill()
            with pytest.raises(BackendUnavailable):
                b.counts()
            server.start()  # same port, same directory: the AOF is replayed
            c = b.counts()
            assert (c.inserted, c.queued, c.leased) == (50, 40, 10)
            rest = b.lease(100, 30)
            assert len(rest) == 40
            assert not {lease.task_id for lease in rest} & {lease.task_id for lease in held}
            assert b.complete([(lease.task_id, lease.token, b"r") for lease in held + rest]) == [True] * 50
            assert len(b.results("j1")) == 50
    finally:
        server.stop()


def test_warns_once_when_the_server_may_evict_keys(tmp_path):
    with RedisServer(tmp_path / "lru", ["--maxmemory-policy", "allkeys-lru"]) as server:
        client = server.client()
        try:
            client.execute_command(
                "ACL", "SETUSER", "limited", "on", ">limited-pw", "~nbq:{lru}:*", "+@all", "-@dangerous"
            )
        finally:
            client.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # CONFIG denied: no check, no warning
            open_backend(server.url("lru", userinfo="limited:limited-pw@")).close()
        with pytest.warns(RuntimeWarning, match="noeviction"):
            open_backend(server.url("lru")).close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per server and process
            open_backend(server.url("lru")).close()


# -- packaging ----------------------------------------------------------------------------------
def test_import_nbqueue_does_not_import_redis():
    code = "import sys, nbqueue, nbqueue.backends; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_missing_redis_py_names_the_extra_to_install():
    code = "import sys\nsys.modules['redis'] = None\nimport nbqueue.backends.redis"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "pip install 'nbqueue[redis]'" in proc.stderr


def test_rediss_connects_over_tls_with_the_options_passed_through(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not on PATH; install it: apt-get install openssl", pytrace=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-auth-clients", "no"]  # fmt: skip
    with RedisServer(tmp_path / "tls", tls):
        base = f"rediss://127.0.0.1:{tls_port}/0?queue=tls"
        with open_backend(f"{base}&ssl_cert_reqs=none") as b:
            b.insert("j1", tasks_of("j1", 1))
        with open_backend(f"{base}&ssl_ca_certs={cert}&ssl_check_hostname=false") as b:
            assert [lease.task_id for lease in b.lease(1, 30)] == ["j1-0"]
        with pytest.raises(BackendUnavailable, match="certificate"):
            open_backend(base)  # a self-signed certificate fails verification by default
