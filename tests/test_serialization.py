"""Notebook functions survive a fresh interpreter: produced in one process, run by a worker
process, read back in a third."""

from __future__ import annotations

import functools
import re
import socket
import threading

import pytest

from nbqueue import (
    BadSignature,
    BindError,
    DecodeError,
    NotQueueableError,
    QueueURLError,
    SerializationError,
    TaskQueue,
    UnsafeQueueError,
    queueable,
)
from nbqueue.serialize import Signer, open_envelope, seal

from .helpers import notebook, run_python, start_workers, wait_all

PRODUCER = """
import functools, sys
import numpy as np
from nbqueue import RegisteredTask, TaskQueue, queueable

OFFSET = 100

def helper(x):
    return x * 3

@queueable
def uses_global(x):
    return x + OFFSET

@queueable
def calls_helper(x):
    return helper(x) + 1

def make_closure():
    arr = np.arange(131072, dtype=np.float64)   # 1 MiB
    @queueable
    def total(scale):
        return float(arr.sum() * scale)
    return total

square = queueable(lambda x: x * x)

@queueable
def add3(a, b, c):
    return a + b + c

class Multiply(RegisteredTask):
    def __init__(self, a, b):
        self.a, self.b = a, b
    def execute(self):
        return helper(self.a) * self.b

tq = TaskQueue(sys.argv[1])
job = tq.insert([
    functools.partial(uses_global, 1),
    functools.partial(calls_helper, 2),
    functools.partial(make_closure(), 2.0),
    functools.partial(square, 7),
    functools.partial(functools.partial(add3, 1), 2, c=3),
    Multiply(2, 5),
], progress=False)
print(job.id)
"""


def test_notebook_functions_run_in_a_fresh_worker_process(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    made = run_python(PRODUCER, url)
    assert made.returncode == 0, made.stderr
    job_id = made.stdout.strip()
    (code,) = wait_all(start_workers(url, 1, "--burst"), timeout=60)
    assert code == 0
    job = TaskQueue(url).job(job_id)  # reattached from a third process
    assert job.wait(timeout=30, progress=False).results() == [
        101,
        7,
        2.0 * 131072 * 131071 / 2,
        49,
        6,
        30,
    ]
    assert job.errors() == []


def test_function_is_stored_once_per_job(tmp_path):
    nb = notebook("""
        from nbqueue import queueable
        BIG = list(range(100_000))
        @queueable
        def pick(i):
            return BIG[i]
    """)
    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    tq.insert((functools.partial(nb.pick, i) for i in range(50)), progress=False)
    assert len(list((tmp_path / "q" / "fn").iterdir())) == 1
    segment_bytes = sum(p.stat().st_size for p in (tmp_path / "q" / "queue").iterdir())
    assert segment_bytes < 50 * 400  # each task carries its digest and arguments only


@pytest.mark.parametrize("bad,culprit", [(threading.Lock(), "lock"), (socket.socket(), "socket")])
def test_unserializable_argument_names_it_and_queues_nothing(tmp_path, bad, culprit):
    nb = notebook("""
        from nbqueue import queueable
        @queueable
        def use(x):
            return x
    """)
    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    with pytest.raises(SerializationError, match=culprit) as info:
        tq.insert([functools.partial(nb.use, 1), functools.partial(nb.use, bad)], progress=False)
    assert "argument 0" in str(info.value)
    assert tq.status().queued == 0 and tq.jobs() == []
    if isinstance(bad, socket.socket):
        bad.close()


def test_unserializable_global_of_a_function_is_named(tmp_path):
    nb = notebook("""
        import threading
        from nbqueue import queueable
        GUARD = threading.Lock()
        @queueable
        def locked(x):
            with GUARD:
                return x
    """)
    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    with pytest.raises(SerializationError, match="locked.: GUARD: a lock belongs to this process"):
        tq.insert([functools.partial(nb.locked, 1)], progress=False)
    assert tq.status().inserted == 0


def test_wrong_arguments_fail_at_insert_with_the_function_name(tmp_path):
    @queueable
    def scale(x, factor=2):
        return x * factor

    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    with pytest.raises(BindError, match=r"scale\(\).*factr"):
        tq.insert([functools.partial(scale, 1, factr=3)], progress=False)
    with pytest.raises(BindError, match=r"scale\(\)"):
        tq.insert([scale], progress=False)  # x missing
    assert tq.status().inserted == 0 and tq.jobs() == []


def test_arguments_are_named_as_signature_bind_names_them():
    # A plain signature binds without inspect (the cost of a submit); the names, their order and
    # the refusals must be bind's, for every way of calling it.
    import inspect
    import itertools

    from nbqueue.tasks import plain_params, to_call

    @queueable
    def fit(alpha, depth, seed=0, note="x"):
        return alpha

    @queueable
    def flexible(alpha, *rest, seed=0, **extra):
        return alpha

    values = (0.1, 3, 7, "y")
    for fn in (fit, flexible):
        for n in range(len(values) + 1):
            for names in itertools.chain.from_iterable(
                itertools.combinations(("alpha", "depth", "seed", "note", "other"), k) for k in range(3)
            ):
                args, kwargs = values[:n], {name: 5 for name in reversed(names)}  # not in order
                try:
                    expected = plain_params(dict(inspect.signature(fn).bind(*args, **kwargs).arguments))
                except TypeError as exc:
                    with pytest.raises(BindError, match=re.escape(str(exc))):
                        to_call(functools.partial(fn, *args, **kwargs))
                    continue
                if fn is flexible:
                    continue  # *rest and **extra are named otherwise (rest[0], the extra keys)
                params = to_call(functools.partial(fn, *args, **kwargs)).params
                assert params == expected and list(params or {}) == list(expected or {})


def test_non_queueable_callables_are_refused(tmp_path):
    def plain(x):
        return x

    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    with pytest.raises(NotQueueableError, match=r"plain\(\) is not marked @queueable"):
        tq.insert([functools.partial(plain, 1)], progress=False)
    with pytest.raises(NotQueueableError):
        tq.insert([print], progress=False)
    with pytest.raises(NotQueueableError):
        tq.insert([42], progress=False)
    assert tq.status().inserted == 0


def test_bad_urls_and_unsafe_directories_are_refused(tmp_path):
    with pytest.raises(QueueURLError, match="unknown queue scheme 'sqs://'"):
        TaskQueue("sqs://bucket")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(QueueURLError, match="is a file"):
        TaskQueue(f"fq://{a_file}")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeQueueError, match="writable by group or others"):
        TaskQueue(f"fq://{shared}")
    assert list(shared.iterdir()) == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(QueueURLError, match="not an nbqueue queue"):
        TaskQueue(f"fq://{busy}")


def test_created_queue_files_are_private(tmp_path):
    nb = notebook("""
        from nbqueue import queueable
        @queueable
        def one():
            return 1
    """)
    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    tq.insert([nb.one], progress=False)
    for path in (tmp_path / "q").rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_envelopes_refuse_other_keys_flipped_bytes_and_other_task_ids():
    signer = Signer(b"k1")
    blob = seal(signer, {"kind": "task", "t": "j-1", "j": "j"}, b"payload")
    assert open_envelope(signer, blob, "task", t="j-1")[1] == b"payload"
    with pytest.raises(BadSignature):
        open_envelope(Signer(b"k2"), blob, "task")
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        with pytest.raises((BadSignature, DecodeError)):
            open_envelope(signer, bytes(flipped), "task", t="j-1")
    with pytest.raises(BadSignature, match="made for t='j-1'"):
        open_envelope(signer, blob, "task", t="j-2")


def test_key_file_is_made_private_and_bad_keys_are_refused(tmp_path, monkeypatch):
    from nbqueue import SigningKeyError
    from nbqueue.serialize import load_key

    monkeypatch.delenv("NBQUEUE_SECRET")
    key_file = tmp_path / "conf" / "secret.key"
    monkeypatch.setenv("NBQUEUE_KEY_FILE", str(key_file))
    key = load_key()
    assert len(key) == 64 and (key_file.stat().st_mode & 0o777) == 0o600 and load_key() == key
    key_file.chmod(0o644)
    with pytest.raises(SigningKeyError, match="mode 0600"):
        load_key()
    key_file.chmod(0o600)
    key_file.write_bytes(b"")
    with pytest.raises(SigningKeyError, match="shorter than 16 bytes"):
        load_key()
    monkeypatch.setenv("NBQUEUE_SECRET", "short")
    with pytest.raises(SigningKeyError):
        load_key()


def test_notebook_subclasses_of_plain_types_travel_by_value(tmp_path):
    producer = """
import enum, functools, sys
from nbqueue import TaskQueue, queueable

class Tag(str):
    pass

@queueable
def describe(tag):
    return f"{tag.upper()}:{type(tag).__name__}"

job = TaskQueue(sys.argv[1]).insert([functools.partial(describe, Tag("x"))], progress=False)
print(job.id)
"""
    url = f"fq://{tmp_path / 'q'}"
    made = run_python(producer, url)
    assert made.returncode == 0, made.stderr
    assert wait_all(start_workers(url, 1, "--burst"), timeout=60) == [0]
    job = TaskQueue(url).job(made.stdout.strip())
    assert job.wait(timeout=30, progress=False).results() == ["X:Tag"]


def test_only_plain_data_is_marked_for_the_plain_loader():
    # Arguments and values that plain pickle ships are marked so (the worker and the waiter
    # load them without dill); anything a notebook defines is not, and dill loads it.
    from nbqueue.records import open_record, seal_record
    from nbqueue.serialize import PLAIN_PICKLE, get_serializer
    from nbqueue.tasks import TaskCodec, open_task, to_call

    nb = notebook(
        "from nbqueue import queueable\nclass Tag(str):\n    pass\n@queueable\ndef f(x):\n    return x\n"
    )
    signer, dill_serializer = Signer(b"k" * 32), get_serializer("dill")
    codec = TaskCodec(signer, dill_serializer, "q1")
    for arg, marked in ((3, True), ({"a": [1.5, "b"]}, True), (nb.Tag("x"), False)):
        call = to_call(functools.partial(nb.f, arg))
        digest, _, _ = codec.function_digest(nb.f)
        header, _ = open_task(signer, "j-0", codec.encode("j-0", "j", call, digest))
        assert (header.get(PLAIN_PICKLE) == 1) is marked
        kwargs = {"attempt": 1, "started": 0.0, "finished": 1.0, "worker": "w"}
        sealed = seal_record(signer, dill_serializer, "j-0", "j", value=arg, **kwargs)
        header, _ = open_envelope(signer, sealed, "result", j="j")
        assert (header.get(PLAIN_PICKLE) == 1) is marked
        record = open_record(signer, dill_serializer, "j-0", sealed, "j")
        assert record.value == arg and type(record.value) is type(arg)


def test_an_enum_defined_in_the_notebook_is_refused_at_insert(tmp_path):
    nb = notebook("""
import enum
from nbqueue import queueable

class Color(enum.IntEnum):
    RED = 1

@queueable
def paint(color):
    return color.name
""")
    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    with pytest.raises(SerializationError, match="Color"):
        tq.insert([functools.partial(nb.paint, nb.Color.RED)], progress=False)
    assert tq.status().inserted == 0
