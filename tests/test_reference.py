"""Tasks by reference: the JSON encoding, task specs, and workers that run only installed code."""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import sys
import textwrap

import numpy as np
import pytest

import nbqueue
from nbqueue import NotQueueableError, SerializationError, SpecError, TaskQueue, TaskSpec, handles
from nbqueue.reference import decode_value, dumps_spec, encode_value, export_value, loads_spec, parse_spec
from nbqueue.serialize import open_envelope, seal
from nbqueue.tasks import load_specs

from .helpers import CANARY_SOURCE, notebook, start_workers, wait_all

#: An "installed" module: workers import it by name from PYTHONPATH.
STEPS = """
import os
from nbqueue import Terminal, queueable

@queueable(by_reference=True)
def scale(x, factor=2):
    return x * factor

@queueable(by_reference=True)
def describe(data, arr, ratio, missing=None):
    return {"data": data, "sum": float(arr.sum()), "shape": arr.shape, "dtype": str(arr.dtype),
            "ratio": ratio, "missing": missing, "pid": os.getpid()}

@queueable(by_reference=True)
def refuse(reason):
    raise Terminal(reason)

@queueable
def by_value_but_installed(x):
    return x + 1

def unmarked(x):
    return x
"""


@pytest.fixture
def steps(tmp_path, monkeypatch):
    """The module ``nbq_ref_steps``, importable here and by worker processes."""
    (tmp_path / "nbq_ref_steps.py").write_text(STEPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    )
    sys.modules.pop("nbq_ref_steps", None)
    yield importlib.import_module("nbq_ref_steps")
    sys.modules.pop("nbq_ref_steps", None)


# -- the encoding ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.arange(12, dtype=">i4").reshape(4, 3).T,  # big-endian and not contiguous
        np.array(3.5),
        np.zeros((0, 2), dtype=np.uint8),
        np.array([b"ab", b"c"]),
        np.array([True, False]),
    ],
)
def test_numpy_arrays_round_trip_exactly(array):
    encoded = encode_value(array)
    assert set(encoded) == {"__ndarray__", "dtype", "shape"} and encoded["shape"] == list(array.shape)
    back = decode_value(json.loads(json.dumps(encoded)))
    assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)
    assert back.flags.writeable  # a copy, not a view of the decoded bytes


def test_json_values_bytes_and_special_floats_round_trip():
    value = {"a": [1, 2.5, None, True, "x"], "b": b"\x00\xffraw", "t": (1, 2), "n": np.int64(7)}
    value["f"] = [math.inf, -math.inf]
    encoded = json.loads(json.dumps(encode_value(value), allow_nan=False))
    assert encoded["b"] == {"__bytes__": "AP9yYXc="} and encoded["n"] == 7
    back = decode_value(encoded)
    assert back == {**value, "t": [1, 2], "n": 7}
    assert math.isnan(decode_value(encode_value(math.nan)))


@pytest.mark.parametrize(
    "value, message",
    [
        ({1, 2}, "argument 0 is a set"),
        ({"k": object()}, r"argument 0\['k'\] is a object"),
        ({1: "x"}, "dict key 1 is not a string"),
        ({"__bytes__": "x", "other": 1}, "reserved"),
        (np.array([object()]), "is a ndarray"),
    ],
)
def test_values_the_encoding_cannot_express_are_refused(value, message):
    with pytest.raises(TypeError, match=message):
        encode_value(value, where="argument 0")


def test_export_falls_back_to_repr_which_cannot_be_read_back():
    assert export_value({"s": {3}, "ok": [1]}) == {"s": {"__repr__": "{3}"}, "ok": [1]}
    with pytest.raises(ValueError, match="output only"):
        decode_value({"__repr__": "{3}"})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"__bytes__": "not base64!"}, "malformed __bytes__"),
        ({"__ndarray__": "AAAA", "dtype": "<f8", "shape": [2]}, "do not make an array"),
        ({"__ndarray__": "", "dtype": "O", "shape": [0]}, "not a plain"),
        ({"__float__": "big"}, "malformed __float__"),
        ({"__bytes__": "", "extra": 1}, "exactly its own keys"),
    ],
)
def test_malformed_tags_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        decode_value(data)


# -- specs -----------------------------------------------------------------------------------------
def test_spec_payload_round_trips_and_parse_checks_the_shape():
    spec = TaskSpec("pkg.mod:func", (b"x", [1]), {"arr": np.ones(2)})
    back = loads_spec(dumps_spec(spec))
    assert (
        back.fn == "pkg.mod:func" and back.args == (b"x", [1]) and np.array_equal(back.kwargs["arr"], [1, 1])
    )
    assert parse_spec({"fn": "m:f"}) == TaskSpec("m:f", (), {})
    for bad, message in [
        ({"fn": "no_colon"}, "not 'module:qualname'"),
        ({"fn": "m:<lambda>"}, "not 'module:qualname'"),
        ({"fn": "m:f", "args": {}}, "args must be a JSON array"),
        ({"fn": "m:f", "kwargs": []}, "kwargs must be a JSON object"),
        ({"fn": "m:f", "extra": 1}, "unknown key"),
        ({"args": []}, "needs 'fn'"),
        ([], "JSON object"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


def test_load_specs_names_the_bad_line(steps):
    good = '{"fn": "nbq_ref_steps:scale", "args": [1]}'
    assert len(load_specs([good, "", good], "f.jsonl")) == 2
    for line, message in [
        ("{not json", "line 2: Expecting property name"),
        ('{"fn": "nbq_ref_steps:nope"}', "line 2: nbq_ref_steps:nope: cannot import it"),
        ('{"fn": "no_such_module_xyz:f"}', "No module named 'no_such_module_xyz'"),
        ('{"fn": "nbq_ref_steps:unmarked", "args": [1]}', "is not an @queueable function"),
        ('{"fn": "nbq_ref_steps:scale", "args": [1, 2, 3]}', r"line 2: scale\(\): too many positional"),
    ]:
        with pytest.raises(SpecError, match=message):
            load_specs([good, line], "f.jsonl")
    with pytest.raises(SpecError, match="holds no task specs"):
        load_specs(["", "  "], "empty.jsonl")


# -- inserting and running -------------------------------------------------------------------------
def test_by_reference_tasks_ship_no_code_and_run_on_a_worker_that_refuses_pickles(steps, tmp_path):
    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    job = tq.insert(
        [
            functools.partial(steps.describe, b"\x00raw", arr, math.nan),
            functools.partial(steps.scale, 21),
            TaskSpec("nbq_ref_steps:scale", ("ab",), {"factor": 3}),
            TaskSpec("nbq_ref_steps:by_value_but_installed", (1,)),  # a spec never ships code
        ],
        progress=False,
    )
    assert list(tq.backend.iter_functions()) == []
    for task_id, payload in tq.backend.iter_queued():
        header, body = open_envelope(tq.signer, payload, "task", t=task_id, j=job.id)
        assert "f" not in header and json.loads(body)["fn"].startswith("nbq_ref_steps:")
    assert wait_all(start_workers(url, 1, "--burst", "--only-by-reference"), timeout=60) == [0]
    described, scaled, text, plus = job.wait(timeout=30, progress=False).results()
    assert described["data"] == b"\x00raw" and described["sum"] == 15.0 and described["shape"] == (2, 3)
    assert (
        described["dtype"] == "int32" and math.isnan(described["ratio"]) and described["pid"] != os.getpid()
    )
    assert (scaled, text, plus) == (42, "ababab", 2)


def test_only_by_reference_worker_never_unpickles_a_dill_task(steps, tmp_path):
    nb = notebook(
        textwrap.dedent(
            """
            from nbqueue import queueable

            @queueable
            def touch(obj):
                return "ran"
            """
        )
        + CANARY_SOURCE
    )
    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    canary = tmp_path / "canary"
    shipped = tq.insert([functools.partial(nb.touch, nb.Canary(str(canary)))], progress=False)
    control = tq.insert([functools.partial(steps.scale, 2)], progress=False)
    assert wait_all(start_workers(url, 1, "--burst", "--only-by-reference"), timeout=60) == [0]
    assert control.wait(timeout=10, progress=False).results() == [4]
    (error,) = shipped.wait(timeout=10, progress=False).errors()
    assert not canary.exists(), "an --only-by-reference worker loaded a pickle"
    assert error.type == "TaskRefused" and "--only-by-reference" in error.message and error.attempts == 1
    (letter,) = tq.dead()
    assert letter.task_id == f"{shipped.id}-0"


def test_worker_refuses_a_signed_spec_naming_code_that_is_not_queueable(steps):
    tq = TaskQueue("mem://by-reference-refusals")
    for index, fn in enumerate(["os:getcwd", "nbq_ref_steps:unmarked", "no_such_module_xyz:f"]):
        payload = json.dumps({"fn": fn, "args": [], "kwargs": {}}).encode()
        header = {"kind": "task", "q": tq.queue_id, "t": f"jx-{index}", "j": "jx", "c": 0}
        envelope = seal(tq.signer, header, payload)
        tq.backend.insert("jx", [(f"jx-{index}", envelope)])
    stats = tq.poll(max_attempts=3, burst=True)
    assert stats.dead == 3 and stats.completed == 0
    errors = {d.task_id: d.error for d in tq.dead()}
    assert b"TaskRefused" in errors["jx-0"] and b"not an @queueable function" in errors["jx-0"]
    assert b"TaskRefused" in errors["jx-1"]
    assert b"DecodeError" in errors["jx-2"] and b"cannot import no_such_module_xyz:f" in errors["jx-2"]


def test_by_reference_refuses_notebook_functions_and_unencodable_arguments(steps):
    nb = notebook(
        """
        from nbqueue import queueable

        @queueable(by_reference=True)
        def in_notebook(x):
            return x
        """
    )
    tq = TaskQueue("mem://by-reference-insert-errors")
    with pytest.raises(NotQueueableError, match="defined in __main__"):
        tq.insert([functools.partial(nb.in_notebook, 1)], progress=False)
    with pytest.raises(SerializationError, match=r"nbq_ref_steps:scale by reference: argument 0 is a set"):
        tq.insert([functools.partial(steps.scale, {1})], progress=False)
    assert tq.status().inserted == 0 and tq.jobs() == []
    with pytest.raises(TypeError, match="needs a function"):

        @steps.queueable(by_reference=True)
        class Task:
            def execute(self):
                return 1


def test_submit_and_map_by_reference_run_under_only_by_reference(steps, monkeypatch):
    monkeypatch.setattr(handles, "_default", None)
    tq = nbqueue.use("mem://by-reference-submit")
    handle = steps.scale.submit(4, factor=3)
    job = steps.scale.map(["a", "b"], progress=False)
    assert tq.poll(only_by_reference=True, burst=True).completed == 3
    assert handle.get(timeout=5) == 12 and job.results() == ["aa", "bb"]
