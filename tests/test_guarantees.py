"""Guarantees under hostile conditions: killed producers, foreign owners, tampered bytes, fuzzed
input. Nothing here mocks our storage; counting unpickles uses a serializer registered for it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbqueue import BadSignature, DecodeError, TaskQueue, UnsafeQueueError
from nbqueue.backends import segments
from nbqueue.backends.file import FileBackend
from nbqueue.serialize import SERIALIZERS, DillSerializer, Signer, open_envelope, seal
from nbqueue.tasks import TaskCall, TaskCodec

from .helpers import CANARY_SOURCE, notebook

NB = """
import os
from nbqueue import queueable

@queueable
def touch(obj):
    return "ran"

@queueable
def ident(i):
    return i
"""


class CountingSerializer(DillSerializer):
    """dill, counting every load: the tests assert rejected bytes never reach one."""

    name = "counting"
    loads_calls = 0

    def loads(self, data: bytes):
        CountingSerializer.loads_calls += 1
        return super().loads(data)


SERIALIZERS["counting"] = CountingSerializer()


@pytest.fixture
def nb():
    return notebook(NB + CANARY_SOURCE)


# -- a producer killed mid-insert ------------------------------------------------------------------
def test_producer_killed_mid_insert_leaves_exact_total_and_whole_tasks(tmp_path):
    url = f"fq://{tmp_path / 'q'}"
    producer = subprocess.Popen([sys.executable, "-c", """
import functools, sys, time
from nbqueue import TaskQueue, queueable

@queueable
def ident(i):
    return i

def slow():
    for i in range(100_000):
        if i % 100 == 0:
            time.sleep(0.05)
        yield functools.partial(ident, i)

TaskQueue(sys.argv[1]).insert(slow(), batch_size=100, progress=False)
""", url])  # fmt: skip
    tq = TaskQueue(url)
    deadline = time.monotonic() + 60
    while tq.status().queued < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    (job,) = tq.jobs()
    assert job.meta["state"] == "inserting"  # it never got to say otherwise
    assert job.total == job.counts().inserted == tq.status().queued >= 500  # the dead producer's exact total
    assert job.total % 100 == 0  # whole batches only: nothing half-written is visible
    tq.poll(burst=True)
    assert job.results() == list(range(job.total))


# -- permissions ------------------------------------------------------------------------------------
def test_a_queue_directory_owned_by_someone_else_is_refused(tmp_path):
    if os.geteuid() == 0:
        foreign = tmp_path / "theirs"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)  # nobody
    else:
        foreign = "/usr"  # a root-owned directory
    with pytest.raises(UnsafeQueueError, match="belongs to another user"):
        TaskQueue(f"fq://{foreign}")


# -- tampering --------------------------------------------------------------------------------------
def test_tampered_unsigned_and_replayed_tasks_are_never_loaded(tmp_path, nb):
    url = f"fq://{tmp_path / 'q'}"
    tq = TaskQueue(url, serializer="counting")
    canaries = {
        name: tmp_path / name for name in ("unsigned", "replayed", "flipped", "other-queue", "genuine")
    }
    good = TaskCodec(Signer.default(), tq.serializer, tq.queue_id)
    digest, blob, _ = good.function_digest(nb.touch)
    tq.backend.put_function(digest, blob)

    def envelope(codec: TaskCodec, task_id: str, canary: str) -> bytes:
        return codec.encode(
            task_id, task_id.rsplit("-", 1)[0], TaskCall(nb.touch, (nb.Canary(canary),)), digest
        )

    unsigned = TaskCodec(Signer(None), tq.serializer, tq.queue_id)  # an --insecure producer
    tq.backend.insert("ja", [("ja-0", envelope(unsigned, "ja-0", str(canaries["unsigned"])))])
    # A genuine envelope made for another task, replayed under this task's id.
    tq.backend.insert("jb", [("jb-1", envelope(good, "jb-0", str(canaries["replayed"])))])
    flipped = bytearray(envelope(good, "jc-0", str(canaries["flipped"])))
    flipped[len(flipped) // 2] ^= 0x20
    tq.backend.insert("jc", [("jc-0", bytes(flipped))])
    # A genuine envelope, same key and same task id, made for another queue and copied in here.
    other = TaskQueue(f"fq://{tmp_path / 'other'}", serializer="counting")
    elsewhere = TaskCodec(Signer.default(), other.serializer, other.queue_id)
    tq.backend.insert("je", [("je-0", envelope(elsewhere, "je-0", str(canaries["other-queue"])))])
    CountingSerializer.loads_calls = 0
    stats = tq.poll(burst=True)
    assert stats.dead == 4 and CountingSerializer.loads_calls == 0  # not one unpickle
    assert not any(path.exists() for path in canaries.values())
    letters = {letter.task_id: letter.error for letter in tq.dead()}
    assert sorted(letters) == ["ja-0", "jb-1", "jc-0", "je-0"]
    assert b"signed for queue" in letters["je-0"]
    # The control: the same canary, genuinely signed, is loaded (and fires) when run.
    tq.backend.insert("jd", [("jd-0", envelope(good, "jd-0", str(canaries["genuine"])))])
    tq.poll(burst=True)
    assert canaries["genuine"].exists()


def test_a_forged_result_fails_to_load_with_a_clear_message(tmp_path, nb):
    tq = TaskQueue(f"fq://{tmp_path / 'q'}")
    job = tq.insert([functools.partial(nb.ident, 1)], progress=False)
    from nbqueue.records import seal_record

    forged = seal_record(
        Signer(b"someone-elses-key-0123456789"),
        tq.serializer,
        f"{job.id}-0",
        job.id,
        value="forged",
        attempt=1,
        started=0,
        finished=0,
        worker="x",
    )
    (lease,) = tq.backend.lease(1, 30)
    tq.backend.complete([(lease.task_id, lease.token, forged)])
    with pytest.raises(BadSignature, match="bad signature"):
        job.results()


# -- fuzzing ---------------------------------------------------------------------------------------
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SIGNER = Signer(b"fuzzing-key-0123456789abcdef")
GENUINE = seal(SIGNER, {"kind": "task", "t": "j-0", "j": "j"}, b"\x80\x05payload")


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_never_pass_the_envelope_check(blob):
    with pytest.raises((BadSignature, DecodeError)):
        open_envelope(SIGNER, blob, "task", t="j-0")


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GENUINE) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_mutated_envelopes_are_refused(flips):
    blob = bytearray(GENUINE)
    for at, mask in flips:
        blob[at] ^= mask
    if bytes(blob) == GENUINE:
        return
    with pytest.raises((BadSignature, DecodeError)):
        open_envelope(SIGNER, bytes(blob), "task", t="j-0")


#: Segments of up to five frames with ASCII ids: a valid one, or one damaged at one byte (or cut).
FRAMES = st.lists(
    st.tuples(st.from_regex(r"jx-[0-9]{1,3}", fullmatch=True), st.binary(max_size=64)), min_size=1, max_size=5
)
DAMAGE = st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.integers(0, 255)))


def damaged(blob: bytes, damage) -> bytes:
    """``blob`` with one byte changed (mask 0: cut off there instead), or as it was."""
    if damage is None:
        return blob
    at, mask = damage[0] % len(blob), damage[1]
    return blob[:at] if mask == 0 else blob[:at] + bytes([blob[at] ^ mask]) + blob[at + 1 :]


def _outcome(read, source, lo, hi):
    try:
        return read(source, lo, hi)
    except segments.CorruptSegment:
        return "corrupt"


@FUZZ
@given(frames=FRAMES, damage=DAMAGE, noise=st.binary(max_size=512))
def test_damaged_segments_only_raise_corrupt_segment_and_read_agrees(tmp_path_factory, frames, damage, noise):
    """Random bytes never get past the magic, so damage real segments as well: every outcome is
    the frames, or CorruptSegment, the same from a whole-file decode and a partial read."""
    for blob in (noise, damaged(segments.encode(frames), damage)):
        path = tmp_path_factory.mktemp("seg") / "s"
        path.write_bytes(blob)
        outcomes = []
        for lo, hi in ((0, None), (1, 3)):
            outcomes.append(_outcome(segments.decode, blob, lo, hi))
            with open(path, "rb") as f:
                outcomes.append(_outcome(segments.read, f, lo, hi))
        assert outcomes[0] == outcomes[1] and outcomes[2] == outcomes[3]
        if blob != noise and damage is None:
            assert outcomes[0] == frames and outcomes[2] == frames[1:3]  # the valid path was taken


ENVELOPES = st.one_of(
    st.binary(max_size=120),  # junk
    st.just(GENUINE),  # genuine, but made for another task (and no queue)
    st.builds(
        lambda at, mask: damaged(GENUINE, (at, mask or 1)), st.integers(0, 10_000), st.integers(1, 255)
    ),
)


@FUZZ
@given(payloads=st.lists(ENVELOPES, min_size=1, max_size=5), damage=DAMAGE, name_ok=st.booleans())
def test_fuzzed_queue_files_are_refused_unread_or_quarantined(tmp_path_factory, payloads, damage, name_ok):
    """Queue files holding junk, genuine-but-misplaced or damaged envelopes, in valid or damaged
    segments, under a valid or foreign name: what a lease hands out is refused before any
    unpickling, and what cannot be leased is quarantined, never a crash."""
    root = tmp_path_factory.mktemp("fq")
    q = FileBackend(str(root / "q"))
    blob = damaged(segments.encode([(f"jx-{k}", p) for k, p in enumerate(payloads)]), damage)
    name = f"0000000000000.0.jx.fz.0-{len(payloads)}" if name_ok else "junk"
    (root / "q" / "queue" / name).write_bytes(blob)
    CountingSerializer.loads_calls = 0
    codec = TaskCodec(SIGNER, SERIALIZERS["counting"], q.queue_id())
    leases = q.lease(10, 30)
    for lease in leases:
        with pytest.raises((BadSignature, DecodeError)):
            codec.decode(lease.task_id, lease.payload, q.get_function)
    assert CountingSerializer.loads_calls == 0
    if name_ok and damage is None:
        assert len(leases) == len(payloads)  # the leasing path really ran
    else:
        assert leases or os.listdir(root / "q" / "quarantine")
