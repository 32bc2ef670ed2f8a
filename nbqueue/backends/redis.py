"""redis:// — the storage contract on a Redis server (6.0 or newer).

URL: ``redis://[user:pass@]host:port/db?queue=NAME`` or ``rediss://`` for TLS. Query options:
``queue`` (default ``default``; letters, digits, ``_ . -``), ``result_ttl`` (seconds a finished
job's results and record are kept, default ``RESULT_TTL_SECONDS``), and these passed on to
redis-py: ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_check_hostname``, ``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval``,
``client_name``.

Every state change is one Lua script (``redis_scripts/*.lua``), so it is atomic and needs one
round trip. Deadlines and retry times come from the server's clock (``TIME`` inside the
scripts), never a client's. Key layout, all under one prefix ``nbq:{NAME}:`` whose hash tag
puts a queue's keys in one Redis Cluster slot:

======================  ======  =============================================================
``ready``               list    task ids ready to lease, queued by an nbqueue before jobs took
                                turns (leased first; nothing is added to it any more)
``turns``               zset    job id -> its turn, for every job with ready tasks: the lowest
                                score is served next (``-priority * 2**40 + turn``)
``turn``                string  the turn counter (INCR)
``priority``            hash    job id -> its priority, for jobs inserted with one
``delayed``             zset    task id -> ms when a retry (or a delayed insert) becomes ready
``leases``              zset    task id -> ms lease deadline
``tokens``              hash    task id -> token of its current lease
``payload``             hash    task id -> payload, for every queued or leased task
``attempts``            hash    task id -> leases that counted (see ``Lease.attempt``)
``suspects``            set     task ids a lease of which expired (see ``Lease.suspect``)
``counts``              hash    queue counters (``COUNT_FIELDS``), changed with HINCRBY
``dead``                hash    task id -> error record of a dead letter
``dead_payload``        hash    task id -> payload of a dead letter
``dead_attempts``       hash    task id -> attempts of a dead letter
``notify``              list    wake-up tokens for blocked ``lease`` calls (trimmed)
``jobs``                zset    job id -> µs first seen: the index of every job's keys
``functions``           set     digests of the stored function blobs
``inserts``             zset    nonce -> ms of recent insert calls (makes retries idempotent)
``workers``             hash    worker id -> info from its last heartbeat
``worker_expiry``       zset    worker id -> ms its last heartbeat expires
``ready:<job>``         list    one job's ready task ids, FIFO (gone when empty)
``delayed:<job>``       zset    one job's part of ``delayed`` (gone when empty)
``jc:<job>``            hash    one job's counters
``results:<job>``       hash    task id -> result (or dead letter's error) record
``cancel:<job>``        hash    cancel marks: ``*`` (the whole job) or a task id -> the record
                                a cancelled task ends with
``cancelled:<job>``     hash    task id -> payload of a cancelled task (for ``retry``)
``job:<job>``           string  the job's record
``log:<job>``           stream  the job's commit log: the task ids each commit recorded
``ran:<job>``           set     the workers that ran tasks of the job
``fn:<digest>``         string  a function blob (no TTL: see ``put_function.lua``)
======================  ======  =============================================================

The queue structures never expire. The per-job keys of ``JOB_KINDS`` stay while the job has
tasks queued or leased, and expire ``result_ttl`` seconds after the last change once it has none.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import defaults
from ..errors import BackendUnavailable, QueueURLError, StorageFull
from ..ids import check_batch, check_id, check_tasks_of, check_worker_id, index_of, job_of
from . import redact_url
from .base import (
    COUNT_FIELDS,
    Backend,
    CommitWatch,
    Counts,
    DeadLetter,
    Lease,
    TaskInfo,
    TaskStatus,
    identity_changed,
)

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import (
        AuthenticationError,
        NoPermissionError,
        NoScriptError,
        OutOfMemoryError,
        ResponseError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("redis:// queues need redis-py: pip install 'nbqueue[redis]'") from exc

KEY_PREFIX = "nbq"
#: Fixed keys of a queue; each is ``nbq:{NAME}:<name>``.
QUEUE_KEYS = (
    "ready",
    "turns",
    "turn",
    "priority",
    "delayed",
    "leases",
    "tokens",
    "payload",
    "attempts",
    "suspects",
    "counts",
    "dead",
    "dead_payload",
    "dead_attempts",
    "notify",
    "jobs",
    "functions",
    "inserts",
    "workers",
    "worker_expiry",
    "id",
)
#: Kinds of per-job keys, ``nbq:{NAME}:<kind>:<job_id>``, that expire with a finished job.
JOB_KINDS = ("jc", "results", "log", "job", "cancel", "cancelled", "ran")
#: Kinds of per-job keys that empty as the job's tasks are taken (gone when empty, never expired).
JOB_WORK_KINDS = ("ready", "delayed")
#: Kind of function keys, ``nbq:{NAME}:fn:<digest>``.
FUNCTION_KIND = "fn"

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # 0 would make sockets non-blocking; NaN fails this too
        raise ValueError(text)
    return value


#: URL query options handed to redis-py, with their parsers.
_CLIENT_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "socket_timeout": _seconds,
    "socket_connect_timeout": _seconds,
    "health_check_interval": int,
    "client_name": str,
}
_SOCKET_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 3.0
_HEALTH_CHECK_SECONDS = 30
# Four tries 0.2, 0.4, 0.8 s apart: a refused connection fails in under two seconds, and a
# server restarting with its data is usually back within that.
_RETRIES = 3
_BACKOFF = ExponentialBackoff(cap=2.0, base=0.1)
# One BLPOP blocks at most this long (and well under the socket timeout), then lease looks again.
_MAX_BLOCK_SECONDS = 5.0
_MIN_BLOCK_SECONDS = 0.01  # BLPOP treats 0 as "forever"

# Constants the Lua scripts share with this module, written into their preamble.
_NOTIFY_MAX = 64  # wake-up tokens kept: more waiters than this rarely block on one queue
_RECLAIM_LIMIT = 1000  # expired leases a lease call returns at once, so it stays short
_INSERT_MEMORY_MS = 600_000  # how long an insert's nonce is remembered for retries
_LOG_ENTRY_IDS = 256  # task ids per entry of a job's commit log (see flush_log in common.lua)
_SCRIPT_NAMES = (
    "insert",
    "counts",
    "ready_ids",
    "lease",
    "add_job_worker",
    "renew",
    "complete",
    "fail",
    "release",
    "cancel",
    "failed_payloads",
    "retry",
    "release_all",
    "redrive",
    "purge_dead",
    "rezero",
    "purge",
    "put_job",
    "put_function",
    "list_jobs",
    "heartbeat",
    "workers",
    "put_results",
    "put_dead",
    "queue_id",
)
_IDS_PER_READ = 500  # task ids per HMGET in iter_queued (and digests per MGET)
_PRIMED_MAX = 4  # primed first reads (see primed_watch) holding a connection at once
_SPARE_MAX = 4  # connections kept for the quick calls (see _lean)

_policy_lock = threading.Lock()
_policy_checked: set[tuple[str, int]] = set()

F = TypeVar("F", bound=Callable[..., Any])


def _lua_preamble() -> str:
    """Lua that defines the key names and constants the scripts use, from this module's."""
    names = ", ".join(f"{name} = P .. '{name}'" for name in QUEUE_KEYS)
    return "\n".join(
        [
            "local P = KEYS[1]",
            "local TTL = tonumber(ARGV[1])",
            f"local K = {{{names}}}",
            "local function JK(kind, id) return P .. kind .. ':' .. id end",
            f"local EXPIRING_KINDS = {_lua_list(JOB_KINDS)}",
            f"local JOB_KINDS = {_lua_list(JOB_KINDS + JOB_WORK_KINDS)}",
            f"local FN_KIND = '{FUNCTION_KIND}'",
            f"local NOTIFY_MAX = {_NOTIFY_MAX}",
            f"local RECLAIM_LIMIT = {_RECLAIM_LIMIT}",
            f"local INSERT_MEMORY_MS = {_INSERT_MEMORY_MS}",
            f"local LOG_ENTRY_IDS = {_LOG_ENTRY_IDS}",
            "",
        ]
    )


def _lua_list(names: Sequence[str]) -> str:
    return "{" + ", ".join(f"'{name}'" for name in names) + "}"


@functools.cache
def _script_sources() -> dict[str, str]:
    folder = resources.files(__package__) / "redis_scripts"
    common = _lua_preamble() + (folder / "common.lua").read_text(encoding="utf-8")
    return {name: common + (folder / f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPT_NAMES}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _translated(method: F) -> F:
    """Turn redis-py connection trouble inside ``method`` into BackendUnavailable."""

    @functools.wraps(method)
    def wrapper(self: RedisBackend, *args: Any, **kwargs: Any) -> Any:
        with self._translate_errors():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _RedisWatch(CommitWatch):
    def __init__(self, backend: RedisBackend, job_id: str) -> None:
        self.backend, self.job_id, self.read_record = backend, job_id, backend.record
        self.read_counts = functools.partial(backend.job_counts, job_id)
        # From the log's start, not its end: no read before the first wait (a round trip saved
        # on every get), and that wait returns at once if anything was committed already.
        self.entry, self.woken = b"0-0", False
        self.primed: _PrimedRead | None = None

    def wait(self, timeout: float) -> bool:
        self._move_past_wake()
        self.woken = self.backend.wait_past(self.job_id, self.entry, timeout)
        return self.woken

    def wait_then_read(self, task_id: str, timeout: float) -> tuple[bool, bytes | None]:
        answer = self._primed_answer(timeout, task_id)
        if answer is not None:
            self.woken, found = answer
            return self.woken, found
        self._move_past_wake()
        self.woken, found = self.backend.wait_past_then_read(self.job_id, self.entry, timeout, task_id)
        return self.woken, found

    def _primed_answer(self, timeout: float, task_id: str | None = None) -> tuple[bool, bytes | None] | None:
        """The primed first read's (woken, record of its task), once answered; (False, None)
        while it is not answered within ``timeout`` (asked again next wait); None when there is
        no primed read (for ``task_id``, if given) to wait on, or it was lost (a broken
        connection, a fork): then the usual wait."""
        primed = self.primed
        if primed is None or (task_id is not None and primed.task_id != task_id):
            return None
        answer = primed.answer(timeout)
        if answer is None and primed.pending():
            return False, None
        self.primed = None
        return answer

    def close(self) -> None:
        if self.primed is not None:
            self.primed.discard()
            self.primed = None

    def __del__(self) -> None:
        # A watch dropped with its primed read unanswered (a handle never waited on) gives
        # the read's connection back, closed.
        with contextlib.suppress(Exception):
            self.close()

    def wait_then_counts(self, timeout: float) -> tuple[bool, Counts]:
        answer = self._primed_answer(timeout)
        if answer is not None:  # a one-task job's waiter: the primed read is its wait
            self.woken = answer[0]
            return self.woken, self.read_counts()
        self._move_past_wake()
        self.woken, counts = self.backend.wait_past_then_counts(self.job_id, self.entry, timeout)
        return self.woken, counts

    def _move_past_wake(self) -> None:
        if self.woken:
            # Past everything committed so far, not only the entry that woke the last wait:
            # after a burst of commits this blocks again instead of returning once per entry.
            # (Read here, not on waking: a caller whose wait ended needs no more reads.)
            self.entry, self.woken = self.backend.newest_commit(self.job_id), False


class _PrimedRead:
    """The first wait of a watch, sent with its task's insert: after the ``EVALSHA`` of insert,
    in the same write, an ``XREAD`` of the job's commit log from its start (blocking) and an
    ``HGET`` of the task's record. The connection then stays with this read until it is
    answered: the watch reads the answer when it waits, or the backend takes it in earlier
    (``settle``) to free the connection. A read dropped unanswered has its connection closed,
    since the answer still owed on it would confuse the next user."""

    def __init__(
        self,
        job_id: str,
        task_id: str,
        commands: list[tuple[Any, ...]],
        done: Callable[[_PrimedRead, Any, bool], None],
    ) -> None:
        """``commands``: the read, to send after the insert. ``done(read, connection, close)``:
        the read is over; its connection (None if it had none) goes back, closed if ``close``."""
        self.job_id, self.task_id, self.commands = job_id, task_id, commands
        self._done = done
        self._pid = os.getpid()  # a forked child must not read its parent's socket
        self._lock = threading.Lock()
        self._answer: tuple[bool, bytes | None] | None = None
        self._connection: Any = None  # set by ``sent``, once the read went out

    def sent(self, connection: Any) -> None:
        """The read went out on ``connection``, which is this read's until answered."""
        with self._lock:
            self._connection = connection

    def answer(self, timeout: float) -> tuple[bool, bytes | None] | None:
        """(woken, the task's record or None), once the server answered; None if it has not
        within ``timeout`` seconds, or there is no read to wait for (then ``pending()`` is
        False: never sent, or lost with its connection)."""
        with self._lock:
            if self._answer is None and self.pending():
                self._read(timeout)
            return self._answer

    def pending(self) -> bool:
        """True while an answer may still come."""
        return self._connection is not None and os.getpid() == self._pid

    def settle(self) -> bool:
        """Take the answer in if it is here, freeing the connection; True when this read holds
        no connection (any more). Never blocks: a watch reading now keeps its read."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.pending():
                self._read(0)
            return self._connection is None
        finally:
            self._lock.release()

    def _read(self, timeout: float) -> None:
        connection = self._connection
        try:
            if not connection.can_read(timeout=max(timeout, 0)):
                return
            woke = connection.read_response()
            found = connection.read_response()
        except Exception:
            # Whatever went wrong, the watch's usual wait meets it again, with the client's
            # retries and error messages.
            self._drop(close=True)
            return
        except BaseException:
            self._drop(close=True)
            raise
        self._answer = (bool(woke), found)
        self._drop(close=False)

    def discard(self) -> None:
        """Forget the read; its connection goes back to the pool, closed if still owed an answer."""
        with self._lock:
            self._drop(close=True)

    def _drop(self, close: bool) -> None:
        connection, self._connection = self._connection, None
        if os.getpid() != self._pid:
            connection = None  # the parent's socket: left alone
        self._done(self, connection, close)


def _reply(connection: Any) -> Any:
    """The next reply on ``connection``; an error reply is returned as its exception, read whole
    (so the replies after it stay in step)."""
    try:
        return connection.read_response()
    except ResponseError as exc:
        return exc


def _pooled_connection(pool: Any) -> Any:
    """A connection of the pool's for this object alone, until it is released."""
    try:
        return pool.get_connection()
    except TypeError:  # redis-py before 5.3 asks for a command name
        return pool.get_connection("XREAD")


class RedisBackend(Backend):
    """A queue stored on a Redis server. Open it with ``open_redis(url)``.

    One object is safe to share between threads: each call takes a connection from a pool,
    and a blocking ``lease`` holds only its own connection while it waits.
    """

    blocking_lease = True
    counts_exact = True  # every script changes the records and the counters together

    def __init__(
        self,
        url: str,
        queue: str,
        client: redis.Redis,
        result_ttl: int = defaults.RESULT_TTL_SECONDS,
        password: str | None = None,
        max_block: float = _MAX_BLOCK_SECONDS,
    ) -> None:
        """Use ``open_redis``; this takes an already configured client.

        Args:
            url: the URL to show, already without its password.
            queue: the queue name (validated by the caller).
            client: a redis-py client with ``decode_responses=False``.
            result_ttl: seconds a finished job's keys are kept.
            password: only so it can be scrubbed from error messages.
            max_block: longest single BLPOP, below the client's socket timeout.
        """
        self.url = url
        self.queue = queue
        # Any: redis-py annotates replies as ``bytes | str`` for either decode_responses; this
        # client never decodes, so every reply is bytes.
        self._client: Any = client
        self._ttl = int(result_ttl)
        self._password = password
        self._max_block = max_block
        self._prefix = f"{KEY_PREFIX}:{{{queue}}}:"
        self._scripts = {name: client.register_script(src) for name, src in _script_sources().items()}
        # Primed first reads (primed_watch) not answered yet, and those of them waiting for
        # their job's insert to go out with.
        self._primed: set[_PrimedRead] = set()
        self._unsent_reads: dict[str, _PrimedRead] = {}
        # Connections kept for the quick calls (_lean) and primed reads: taking one from the
        # pool costs a health check (a poll) that a submit or a woken worker would wait for.
        self._spare: list[Any] = []
        self._spare_pid = os.getpid()
        # Guards the three above; reentrant: a settle inside primed_watch drops its read.
        self._connections_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r})"

    # -- key names and plumbing -----------------------------------------------------------------
    def key(self, name: str, ident: str | None = None) -> str:
        """The full key of a queue structure, or with ``ident`` of a per-job/function key."""
        if ident is None:
            if name not in QUEUE_KEYS:
                raise KeyError(name)
            return self._prefix + name
        if name not in JOB_KINDS and name != FUNCTION_KIND:
            raise KeyError(name)
        return f"{self._prefix}{name}:{ident}"

    def _run(self, script: str, *args: Any) -> Any:
        # Every script gets the prefix as its one key (it routes the call to the queue's slot on
        # a cluster) and the TTL as ARGV[1].
        return self._scripts[script](keys=[self._prefix], args=[self._ttl, *args])

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except AuthenticationError as exc:
            raise BackendUnavailable(
                f"redis refused the credentials of {self.url}: {self._scrub(exc)}"
            ) from None
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"cannot reach redis at {self.url}: {self._scrub(exc)}") from None
        except NoPermissionError as exc:
            raise BackendUnavailable(
                f"the redis user of {self.url} lacks a permission nbqueue needs: {self._scrub(exc)}"
            ) from None
        except OutOfMemoryError as exc:
            # "OOM command not allowed" (maxmemory, noeviction): Redis refuses a write in a script
            # only while the script has written nothing yet, so a refused script changed nothing.
            raise StorageFull(
                errno.ENOSPC,
                f"redis at {self.url} is full (maxmemory reached): {self._scrub(exc)}; nothing was "
                "half-written: free memory or raise maxmemory, then retry",
            ) from None

    def _scrub(self, exc: BaseException) -> str:
        message = _one_line(exc)
        return message.replace(self._password, "***") if self._password else message

    def check_server(self) -> None:
        """Connect once, and warn if the server may evict keys (it would lose tasks).

        Raises:
            BackendUnavailable: the server cannot be reached or refuses the credentials.
        """
        with self._translate_errors():
            try:
                config = self._client.config_get("maxmemory-policy")
            except ResponseError:
                # CONFIG denied by an ACL or renamed by a managed service: nothing to check.
                self._client.ping()
                return
        policy = config.get("maxmemory-policy", "")  # redis-py decodes CONFIG GET replies
        kwargs = self._client.get_connection_kwargs()
        server = (str(kwargs.get("host")), int(kwargs.get("port") or 0))
        with _policy_lock:
            if policy in ("", "noeviction") or server in _policy_checked:
                return
            _policy_checked.add(server)
        warnings.warn(
            f"redis at {self.url} has maxmemory-policy {policy!r}: under memory pressure it may "
            "evict queue keys and lose tasks; set maxmemory-policy noeviction",
            RuntimeWarning,
            stacklevel=3,
        )

    # -- functions and jobs ---------------------------------------------------------------------
    @_translated
    def put_function(self, digest: str, blob: bytes) -> None:
        self._run("put_function", digest, bytes(blob))

    @_translated
    def get_function(self, digest: str) -> bytes:
        blob = self._client.get(self.key(FUNCTION_KIND, digest))
        if blob is None:
            raise KeyError(digest)
        return blob

    @_translated
    def put_job(self, job_id: str, meta: bytes) -> None:
        check_id(job_id, "job id")
        self._run("put_job", job_id, bytes(meta))

    @_translated
    def get_job(self, job_id: str) -> bytes | None:
        return self._client.get(self.key("job", job_id))

    @_translated
    def list_jobs(self) -> list[str]:
        return [job.decode() for job in self._run("list_jobs")]

    # -- tasks ----------------------------------------------------------------------------------
    @_translated
    def insert(
        self,
        job_id: str,
        tasks: Sequence[tuple[str, bytes]],
        delay: float = 0.0,
        priority: int = 0,
        record: bytes | None = None,
        queue_id: str | None = None,
    ) -> None:
        check_batch(job_id, tasks)
        args: list[Any] = []
        for task_id, payload in tasks:
            args += (task_id, bytes(payload))
        if not args:
            if queue_id is not None and (current := self._client.get(self.key("id"))) != queue_id.encode():
                raise identity_changed(queue_id, None if current is None else current.decode())
            if record is not None:
                self.put_job(job_id, record)
            return
        delay_ms = _ms(max(delay, 0.0)) if delay > 0 else ""
        nonce = os.urandom(16).hex()
        job_record = b"" if record is None else bytes(record)
        fence = "" if queue_id is None else queue_id
        script_args = (job_id, nonce, delay_ms, int(priority), job_record, fence, *args)
        with self._connections_lock:
            read = self._unsent_reads.pop(job_id, None)
        if read is None:
            refused = self._run("insert", *script_args)
        else:
            refused = self._insert_with_read(read, script_args)
        if isinstance(refused, list):
            raise identity_changed(fence, refused[1].decode() or None)
        _refuse(refused, "already exists")

    def _insert_with_read(self, read: _PrimedRead, script_args: tuple[Any, ...]) -> Any:
        """The insert script, and a primed read after it in the same write; the reply of the
        insert. The read keeps the connection: its answer comes when the task commits. A failed
        connection leaves the insert to the client's retries (it is idempotent by its nonce) and
        the watch to wait the usual way."""
        try:
            connection = self._send([self._evalsha("insert", *script_args), *read.commands])
        except (RedisConnectionError, RedisTimeoutError):
            return self._run("insert", *script_args)
        try:
            reply = _reply(connection)
        except (RedisConnectionError, RedisTimeoutError):
            self._drop_connection(connection)
            return self._run("insert", *script_args)
        except BaseException:
            self._drop_connection(connection)  # read halfway: nothing on it can be trusted
            raise
        read.sent(connection)
        if isinstance(reply, NoScriptError):  # the server forgot its scripts: this loads it
            return self._run("insert", *script_args)
        if isinstance(reply, Exception):
            raise reply
        return reply

    @_translated
    def lease(self, n: int, seconds: float, wait: float = 0.0) -> list[Lease]:
        if n <= 0:
            return []
        end = time.monotonic() + wait
        leases, next_event_ms = self._lease_once(n, seconds)
        while not leases:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            # Sleep on the server until an insert or requeue pushes a wake-up token, or until a
            # delayed task is due or a lease expires (the script said when, by the server clock).
            block = min(remaining, self._max_block)
            if next_event_ms >= 0:
                block = min(block, next_event_ms / 1000)
            leases, next_event_ms = self._block_then_lease(max(block, _MIN_BLOCK_SECONDS), n, seconds)
        return leases

    def _block_then_lease(self, block: float, n: int, seconds: float) -> tuple[list[Lease], int]:
        """BLPOP for a wake-up token, then ``lease`` in the same round trip: a woken worker has
        its task without another one."""
        _, out = self._quick([("BLPOP", self.key("notify"), block)], "lease", *self._lease_args(n, seconds))
        return self._leases_of(out)

    def _quick(self, commands: list[tuple[Any, ...]], script: str | None = None, *args: Any) -> list[Any]:
        """The replies of ``commands`` and then of ``script`` (with ``args``), sent in one write
        on a spare connection (``_lean``): the server runs the script the moment a blocking read
        before it returns. A server that forgot its scripts (restarted, SCRIPT FLUSH) is given
        it, and it runs after; an error reply raises. For the calls on a task's way (a woken
        lease, a commit, a waiter's read): only reads, and scripts safe to send twice, since a
        failed connection sends them again through the client, with its retries."""
        sent = [*commands, self._evalsha(script, *args)] if script is not None else commands
        with self._translate_errors():
            try:
                replies = self._lean(sent)
            except (RedisConnectionError, RedisTimeoutError):
                pipe = self._client.pipeline(transaction=False)
                for command in sent:
                    pipe.execute_command(*command)
                replies = list(pipe.execute(raise_on_error=False))
            if script is not None and isinstance(replies[-1], NoScriptError):
                replies[-1] = self._run(script, *args)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    def _evalsha(self, script: str, *args: Any) -> tuple[Any, ...]:
        """The command that runs ``script`` on this queue (see ``_run``)."""
        return ("EVALSHA", self._scripts[script].sha, 1, self._prefix, self._ttl, *args)

    def _lean(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies (an error reply as its
        exception, in its place), on a spare connection rather than through the client: its
        command path costs a cold call (a worker woken by a task, a user's next cell) some
        100 us before anything is sent, measured, and ``get_connection`` a health check.

        Raises:
            redis.ConnectionError, redis.TimeoutError: the connection failed (it is closed).
        """
        connection = self._send(commands)
        try:
            replies = [_reply(connection) for _ in commands]
        except BaseException:
            self._drop_connection(connection)
            raise
        self._give_back(connection)
        return replies

    def _send(self, commands: list[tuple[Any, ...]]) -> Any:
        """A spare connection (``_spare_connection``), ``commands`` written on it in one write;
        closed on failure."""
        connection = self._spare_connection()
        try:
            connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        except BaseException:
            self._drop_connection(connection)
            raise
        return connection

    def _drop_connection(self, connection: Any) -> None:
        """A connection in an unknown state: closed, and given back to the pool."""
        connection.disconnect()
        self._client.connection_pool.release(connection)

    def _lease_once(self, n: int, seconds: float) -> tuple[list[Lease], int]:
        return self._leases_of(self._run("lease", *self._lease_args(n, seconds)))

    @staticmethod
    def _lease_args(n: int, seconds: float) -> tuple[int, int, str]:
        return _ms(seconds), n, os.urandom(8).hex()

    @staticmethod
    def _leases_of(out: list[Any]) -> tuple[list[Lease], int]:
        """The leases in a reply of lease.lua, and its wait_ms."""
        leases = [
            Lease(task.decode(), token.decode(), int(attempt), payload, bool(suspect))
            for task, token, attempt, payload, suspect in zip(
                out[1::5], out[2::5], out[3::5], out[4::5], out[5::5], strict=True
            )
        ]
        return leases, int(out[0])

    @_translated
    def renew(self, task_id: str, token: str, seconds: float) -> bool:
        return bool(self._run("renew", task_id, token, _ms(seconds)))

    @_translated
    def complete(self, items: Sequence[tuple[str, str, bytes]]) -> list[bool]:
        args: list[Any] = []
        for task_id, token, result in items:
            args += (task_id, token, bytes(result))
        if not args:
            return []
        (out,) = self._quick([], "complete", *args)
        return [bool(ok) for ok in out]

    @_translated
    def fail(self, task_id: str, token: str, error: bytes, retry_in: float | None) -> TaskStatus | None:
        retry = "" if retry_in is None else _ms(max(retry_in, 0.0))
        state = self._run("fail", task_id, token, bytes(error), retry)
        return None if state is None else TaskStatus(state.decode())

    @_translated
    def release(self, task_id: str, token: str) -> bool:
        return bool(self._run("release", task_id, token))

    # -- cancelling -----------------------------------------------------------------------------
    @_translated
    def cancel(self, job_id: str, record: bytes, task_ids: Sequence[str] | None = None) -> int:
        check_id(job_id, "job id")
        if task_ids is None:
            return int(self._run("cancel", job_id, bytes(record), "job"))
        ids = check_tasks_of(job_id, task_ids)
        return int(self._run("cancel", job_id, bytes(record), "tasks", *ids))

    @_translated
    def cancel_requested(self, task_ids: Sequence[str]) -> set[str]:
        by_job: dict[str, list[str]] = {}
        for task_id in task_ids:
            by_job.setdefault(job_of(task_id), []).append(task_id)
        if not by_job:
            return set()
        pipe = self._client.pipeline(transaction=False)
        for job, ids in by_job.items():
            pipe.hmget(self.key("cancel", job), "*", *ids)
        marked: set[str] = set()
        for ids, found in zip(by_job.values(), pipe.execute(), strict=True):
            whole_job = found[0] is not None
            marked.update(t for t, mark in zip(ids, found[1:], strict=True) if whole_job or mark is not None)
        return marked

    # -- watching -------------------------------------------------------------------------------
    def watch_commits(self, job_id: str) -> CommitWatch:
        return _RedisWatch(self, job_id)

    def primed_watch(self, job_id: str, task_id: str) -> CommitWatch | None:
        # The read goes out with the job's next insert through this object (see insert). At
        # most _PRIMED_MAX reads are outstanding: a loop of submits whose handles wait later
        # primes a few, not a connection per task. Reads answered already give theirs back.
        check_id(job_id, "job id")
        check_id(task_id, "task id")
        with self._connections_lock:
            for primed in list(self._primed):
                primed.settle()
            if len(self._primed) >= _PRIMED_MAX or job_id in self._unsent_reads:
                return None
            log = self.key("log", job_id)
            commands = [
                ("XREAD", "COUNT", 1, "BLOCK", _ms(self._max_block), "STREAMS", log, "0-0"),
                ("HGET", self.key("results", job_id), task_id),
            ]
            watch = _RedisWatch(self, job_id)
            watch.primed = read = _PrimedRead(job_id, task_id, commands, self._primed_read_done)
            self._primed.add(read)
            self._unsent_reads[job_id] = read
        return watch

    def _primed_read_done(self, read: _PrimedRead, connection: Any, close: bool) -> None:
        with self._connections_lock:
            self._primed.discard(read)
            if self._unsent_reads.get(read.job_id) is read:
                del self._unsent_reads[read.job_id]
        if connection is None:
            return
        if close:
            self._drop_connection(connection)
        else:
            self._give_back(connection)

    def _give_back(self, connection: Any) -> None:
        """A connection done with, kept as a spare (``_spare_connection``) or given to the pool."""
        with self._connections_lock:
            if self._spare_pid == os.getpid() and len(self._spare) < _SPARE_MAX:
                self._spare.append(connection)
                return
        self._client.connection_pool.release(connection)

    def _spare_connection(self) -> Any:
        """A connection for a quick call or a primed read: a spare one, else the pool's."""
        with self._connections_lock:
            if self._spare_pid != os.getpid():  # a forked child: those are the parent's
                self._spare, self._spare_pid = [], os.getpid()
            if self._spare:
                return self._spare.pop()
        return _pooled_connection(self._client.connection_pool)

    def newest_commit(self, job_id: str) -> bytes:
        """The id of the job's newest commit-log entry (``0-0`` before the first)."""
        with self._translate_errors():
            newest = self._client.xrevrange(self.key("log", job_id), count=1)
        return newest[0][0] if newest else b"0-0"

    def wait_past(self, job_id: str, entry: bytes, timeout: float) -> bool:
        """Block until the job's commit log has an entry past ``entry``, or ``timeout`` passes."""
        # XREAD blocks on the server until an entry past ``entry`` is added, and every waiter on
        # the job wakes (a stream is read, not popped). BLOCK 0 would mean forever.
        with self._translate_errors():
            found = self._client.execute_command(*self._read_past(job_id, entry, timeout))
        return bool(found)

    def _read_past(self, job_id: str, entry: bytes, timeout: float) -> tuple[Any, ...]:
        """The XREAD of the job's commit log past ``entry``, blocking up to ``timeout``."""
        block_ms = max(1, int(min(timeout, self._max_block) * 1000))
        return ("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", self.key("log", job_id), entry)

    def wait_past_then_read(
        self, job_id: str, entry: bytes, timeout: float, task_id: str
    ) -> tuple[bool, bytes | None]:
        """``wait_past``, then the task's record, sent together: the server answers the read as
        soon as the blocking one returns, so a waiter pays one round trip, not two."""
        read = ("HGET", self.key("results", job_of(task_id)), task_id)
        woke, found = self._quick([self._read_past(job_id, entry, timeout), read])
        return bool(woke), found

    def wait_past_then_counts(self, job_id: str, entry: bytes, timeout: float) -> tuple[bool, Counts]:
        """``wait_past``, then the job's counters, in the same round trip."""
        woke, counts = self._quick([self._read_past(job_id, entry, timeout)], "counts", job_id)
        return bool(woke), _counts(*counts)

    @_translated
    def read_commits(
        self, job_id: str, cursor: object | None, limit: int
    ) -> tuple[list[tuple[str, bytes]], object]:
        entry = b"0-0" if cursor is None else cursor
        assert isinstance(entry, bytes), "a cursor of this backend"
        out: list[tuple[str, bytes]] = []
        # Fewer than ``limit`` only when the log has nothing more now. An entry holds the ids one
        # script committed (up to _LOG_ENTRY_IDS), so a read takes a few entries at a time.
        while len(out) < limit:
            count = max(1, (limit - len(out)) // 16)
            found = self._client.xread({self.key("log", job_id): entry}, count=count)
            entries = found[0][1] if found else []
            if not entries:
                break
            entry = entries[-1][0]
            ids = [task for _, fields in entries for task in fields[b"t"].split()]
            records = self._client.hmget(self.key("results", job_id), ids)
            # A task run again (retry) whose new record has not landed yet has none: skipped.
            out += [(t.decode(), r) for t, r in zip(ids, records, strict=True) if r is not None]
        return out, entry

    # -- running failed tasks again -------------------------------------------------------------
    @_translated
    def failed_payloads(self, job_id: str) -> dict[str, bytes]:
        flat = self._run("failed_payloads", check_id(job_id, "job id"))
        return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    @_translated
    def retry(self, job_id: str, tasks: Sequence[tuple[str, bytes]]) -> int:
        check_batch(job_id, tasks)
        if not tasks:
            return 0
        args = [part for task_id, payload in tasks for part in (task_id, bytes(payload))]
        try:
            return int(self._run("retry", job_id, *args))
        except ResponseError as exc:
            if "cannot be retried" in str(exc):
                raise ValueError(str(exc)) from None
            raise

    # -- reads ----------------------------------------------------------------------------------
    @_translated
    def counts(self) -> Counts:
        return _counts(*self._run("counts", ""))

    @_translated
    def job_counts(self, job_id: str) -> Counts:
        return _counts(*self._run("counts", job_id)) if job_id else Counts()

    @_translated
    def results(self, job_id: str) -> dict[str, bytes]:
        return {
            task.decode(): value for task, value in self._client.hgetall(self.key("results", job_id)).items()
        }

    @_translated
    def record(self, task_id: str) -> bytes | None:
        return self._client.hget(self.key("results", job_of(task_id)), task_id)

    @_translated
    def exact_job_finished(self, job_id: str) -> int:
        return self._client.hlen(self.key("results", job_id))

    # -- admin ----------------------------------------------------------------------------------
    @_translated
    def release_all(self, force: bool = False) -> int:
        return int(self._run("release_all", "1" if force else "0"))

    @_translated
    def purge(self) -> None:
        self._run("purge")

    @_translated
    def queue_id(self) -> str:
        return self._run("queue_id", os.urandom(16).hex()).decode()

    @_translated
    def rezero(self) -> Counts:
        self._run("rezero")
        return self.counts()

    @_translated
    def dead(self) -> list[DeadLetter]:
        pipe = self._client.pipeline(transaction=True)
        for name in ("dead", "dead_payload", "dead_attempts"):
            pipe.hgetall(self.key(name))
        errors, payloads, attempts = pipe.execute()
        letters = [
            DeadLetter(task.decode(), int(attempts.get(task, 0)), payloads.get(task, b""), error)
            for task, error in errors.items()
        ]
        return sorted(letters, key=lambda d: (job_of(d.task_id), index_of(d.task_id)))

    @_translated
    def redrive(self, task_ids: Sequence[str] | None = None) -> int:
        return int(self._run("redrive", *_selection(task_ids)))

    @_translated
    def purge_dead(self, task_ids: Sequence[str] | None = None) -> int:
        return int(self._run("purge_dead", *_selection(task_ids)))

    # -- inspection -----------------------------------------------------------------------------
    @_translated
    def peek_queued(self, n: int) -> list[tuple[str, bytes]]:
        if n <= 0:
            return []
        return list(self._payloads_of(self._run("ready_ids", n, "0")))

    @_translated
    def lease_deadlines(self, limit: int) -> list[tuple[str, float]]:
        if limit <= 0:
            return []
        pipe = self._client.pipeline(transaction=True)
        pipe.time()
        pipe.zrange(self.key("leases"), 0, limit - 1, withscores=True)
        (seconds, micros), leases = pipe.execute()
        now_ms = seconds * 1000 + micros / 1000  # the server's clock, which set the deadlines
        return [(task.decode(), (score - now_ms) / 1000) for task, score in leases]

    @_translated
    def find_task(self, task_id: str) -> TaskInfo | None:
        check_id(task_id, "task id")
        pipe = self._client.pipeline(transaction=True)
        pipe.hget(self.key("dead_payload"), task_id)
        pipe.hget(self.key("dead_attempts"), task_id)
        pipe.hexists(self.key("dead"), task_id)
        pipe.hget(self.key("payload"), task_id)
        pipe.hget(self.key("attempts"), task_id)
        pipe.zscore(self.key("leases"), task_id)
        pipe.time()
        pipe.hget(self.key("results", job_of(task_id)), task_id)
        pipe.hmget(self.key("cancel", job_of(task_id)), task_id, "*")
        dead_payload, dead_attempts, dead, payload, attempts, deadline, (secs, micros), done, marks = (
            pipe.execute()
        )
        if dead:
            return TaskInfo(task_id, TaskStatus.DEAD, int(dead_attempts or 0), dead_payload or b"")
        if payload is not None and deadline is not None:
            expires_in = (deadline - (secs * 1000 + micros / 1000)) / 1000
            return TaskInfo(task_id, TaskStatus.LEASED, int(attempts or 0), payload, expires_in)
        if payload is not None:
            return TaskInfo(task_id, TaskStatus.QUEUED, int(attempts or 0), payload)
        if done is not None:
            cancelled = done == (marks[0] if marks[0] is not None else marks[1])
            return TaskInfo(task_id, TaskStatus.CANCELLED if cancelled else TaskStatus.COMPLETED, 0, None)
        return None

    # -- workers --------------------------------------------------------------------------------
    @_translated
    def heartbeat(self, worker_id: str, info: bytes, ttl: float) -> None:
        check_worker_id(worker_id)
        self._run("heartbeat", worker_id, bytes(info), _ms(ttl) if ttl > 0 else 0)

    @_translated
    def add_job_worker(self, job_id: str, worker_id: str) -> None:
        check_id(job_id, "job id")
        self._run("add_job_worker", job_id, check_worker_id(worker_id))

    @_translated
    def job_workers(self, job_id: str) -> set[str]:
        return {
            worker.decode() for worker in self._client.smembers(self.key("ran", check_id(job_id, "job id")))
        }

    @_translated
    def workers(self) -> dict[str, bytes]:
        flat = self._run("workers")
        return {worker.decode(): info for worker, info in zip(flat[::2], flat[1::2], strict=True)}

    # -- copying between queues -----------------------------------------------------------------
    @_translated
    def iter_queued(self) -> Iterator[tuple[str, bytes]]:
        """Every queued task as ``(task_id, payload)``.

        The ids are read at once, atomically; payloads follow in chunks as the iterator is
        consumed, skipping tasks completed meanwhile.
        """
        return self._payloads_of(self._run("ready_ids", -1, "1"))

    @_translated
    def iter_leased(self) -> Iterator[tuple[str, bytes]]:
        return self._payloads_of(self._client.zrange(self.key("leases"), 0, -1))

    @_translated
    def iter_functions(self) -> Iterator[tuple[str, bytes]]:
        digests = sorted(d.decode() for d in self._client.smembers(self.key("functions")))
        return self._functions_of(digests)

    def _functions_of(self, digests: list[str]) -> Iterator[tuple[str, bytes]]:
        for start in range(0, len(digests), _IDS_PER_READ):
            chunk = digests[start : start + _IDS_PER_READ]
            with self._translate_errors():
                blobs = self._client.mget([self.key(FUNCTION_KIND, d) for d in chunk])
            for digest, blob in zip(chunk, blobs, strict=True):
                if blob is not None:
                    yield digest, blob

    @_translated
    def put_results(self, job_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        check_batch(job_id, items)
        args: list[Any] = []
        for task_id, record in items:
            args += (task_id, bytes(record))
        if args:
            _refuse(self._run("put_results", job_id, *args), "already has a record")

    @_translated
    def put_dead(self, job_id: str, letters: Sequence[DeadLetter]) -> None:
        check_batch(job_id, [(d.task_id, d.payload) for d in letters])
        args: list[Any] = []
        for d in letters:
            if d.error is None:
                raise ValueError("a dead letter needs its error record")
            args += (d.task_id, d.attempts, bytes(d.payload), bytes(d.error))
        if args:
            _refuse(self._run("put_dead", job_id, *args), "already has a record")

    def _payloads_of(self, ids: list[bytes]) -> Iterator[tuple[str, bytes]]:
        for start in range(0, len(ids), _IDS_PER_READ):
            chunk = ids[start : start + _IDS_PER_READ]
            with self._translate_errors():
                payloads = self._client.hmget(self.key("payload"), chunk)
            for task, payload in zip(chunk, payloads, strict=True):
                if payload is not None:
                    yield task.decode(), payload

    def close(self) -> None:
        """Disconnect every pooled connection; the object reconnects if used again."""
        with self._connections_lock:
            spare, self._spare = self._spare, []
        for connection in spare:
            self._client.connection_pool.release(connection)
        self._client.close()


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _refuse(task: bytes | None, why: str) -> None:
    """Scripts that write nothing because of one task return its id: raise ValueError saying why."""
    if task is not None:
        raise ValueError(f"task {task.decode()!r} {why}")


def _selection(task_ids: Sequence[str] | None) -> list[str]:
    return ["all"] if task_ids is None else ["some", *task_ids]


def _counts(flat: list[bytes], scheduled: int) -> Counts:
    """Counts from a counter hash (HGETALL's flat list) and the number of scheduled tasks, which
    the queued counter includes."""
    known = {field.decode(): int(value) for field, value in zip(flat[::2], flat[1::2], strict=True)}
    counts = Counts(**{f: known.get(f, 0) for f in COUNT_FIELDS})
    counts.scheduled = min(int(scheduled), counts.queued)
    counts.queued -= counts.scheduled
    return counts


def parse_redis_url(url: str) -> dict[str, Any]:
    """Split a redis:// or rediss:// queue URL into its parts.

    Returns:
        A dict with ``queue``, ``result_ttl``, ``redacted`` (the URL to show), ``password`` and
        ``client`` (keyword arguments for ``redis.Redis``).

    Raises:
        QueueURLError: the URL is malformed; the message never contains the password.
    """
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise QueueURLError(f"not a redis:// or rediss:// URL: {shown!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise QueueURLError(f"bad port in {shown!r}") from None
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise QueueURLError(f"the path of {shown!r} must be a database number, like /0")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    queue = query.pop("queue", "default")
    if not QUEUE_NAME.match(queue):
        raise QueueURLError(f"invalid queue name {queue!r} in {shown!r}: use letters, digits, '_', '.', '-'")
    result_ttl_text = query.pop("result_ttl", str(defaults.RESULT_TTL_SECONDS))
    if not result_ttl_text.isdigit() or int(result_ttl_text) <= 0:
        raise QueueURLError(f"result_ttl must be a positive number of seconds in {shown!r}")
    password = unquote(parts.password) if parts.password is not None else None
    client: dict[str, Any] = {
        "host": parts.hostname or "localhost",
        "port": port,
        "db": int(db_text),
        "username": unquote(parts.username) if parts.username else None,
        "password": password,
        "ssl": parts.scheme == "rediss",
        "socket_timeout": _SOCKET_TIMEOUT,
        "socket_connect_timeout": _CONNECT_TIMEOUT,
        "health_check_interval": _HEALTH_CHECK_SECONDS,
    }
    for name, text in query.items():
        parse = _CLIENT_OPTIONS.get(name)
        if parse is None:
            known = ", ".join(["queue", "result_ttl", *_CLIENT_OPTIONS])
            raise QueueURLError(f"unknown option {name!r} in {shown!r}; known: {known}")
        try:
            client[name] = parse(text)
        except ValueError:
            raise QueueURLError(f"bad value for {name!r} in {shown!r}") from None
    return {
        "queue": queue,
        "result_ttl": int(result_ttl_text),
        "redacted": shown,
        "password": password,
        "client": client,
    }


def open_redis(url: str) -> RedisBackend:
    """Open the queue a redis:// or rediss:// URL names, checking the server is reachable.

    Raises:
        QueueURLError: the URL is malformed.
        BackendUnavailable: the server cannot be reached or refuses the credentials.
    """
    parsed = parse_redis_url(url)
    client = redis.Redis(
        **parsed["client"],
        retry=Retry(_BACKOFF, _RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    socket_timeout = parsed["client"]["socket_timeout"]
    backend = RedisBackend(
        parsed["redacted"],
        parsed["queue"],
        client,
        result_ttl=parsed["result_ttl"],
        password=parsed["password"],
        max_block=min(_MAX_BLOCK_SECONDS, socket_timeout / 2),
    )
    try:
        backend.check_server()
    except BaseException:
        backend.close()
        raise
    return backend
