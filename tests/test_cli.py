"""The ``nbqueue`` command against real queues and real worker processes, and the README's
"Command line" examples, executed."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import dill
import pytest

from nbqueue import TaskQueue
from nbqueue.transfer import copy_queue

from .helpers import notebook, start_workers, wait_all, wait_for

REPO = Path(__file__).resolve().parent.parent

#: An "installed" module: the CLI's insert and the workers import it by name (PYTHONPATH).
STEPS = """
import time
from nbqueue import Terminal, queueable

@queueable(by_reference=True)
def scale(x, factor=2):
    return x * factor

@queueable(by_reference=True)
def refuse(reason):
    raise Terminal(reason)

@queueable(by_reference=True)
def nap(seconds):
    time.sleep(seconds)
    return seconds
"""

NOTEBOOK = """
from nbqueue import queueable, Terminal

@queueable
def double(x):
    return 2 * x

@queueable
def refuse():
    raise Terminal("planted")
"""


@pytest.fixture
def steps(tmp_path, monkeypatch):
    """``nbq_cli_steps`` on the PYTHONPATH of every process the test starts."""
    (tmp_path / "nbq_cli_steps.py").write_text(STEPS)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    )


def cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``nbqueue ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "nbqueue", *args], capture_output=True, text=True, input=stdin, timeout=timeout
    )


def cli_json(*args: str, code: int = 0):
    """``nbqueue ARGS --json``: its output, parsed, after checking the exit code."""
    out = cli(*args, "--json")
    assert out.returncode == code, out.stderr
    return json.loads(out.stdout)


def write_specs(path: Path, *specs: dict) -> str:
    path.write_text("".join(json.dumps(spec) + "\n" for spec in specs))
    return str(path)


def test_read_and_admin_verbs_with_a_real_worker(worker_url, steps, tmp_path):
    specs = write_specs(
        tmp_path / "specs.jsonl",
        {"fn": "nbq_cli_steps:scale", "args": [1]},
        {"fn": "nbq_cli_steps:scale", "args": [{"__bytes__": "bmI="}], "kwargs": {"factor": 3}},
        {"fn": "nbq_cli_steps:refuse", "args": ["planted"]},
    )
    inserted = cli_json("insert", worker_url, specs, "--name", "pipeline")
    job_id = inserted["job_id"]
    assert inserted["tasks"] == 3
    status = cli_json("status", worker_url)
    assert (status["inserted"], status["queued"], status["leases_expiring"], status["workers"]) == (
        3,
        3,
        [],
        [],
    )
    assert 0 <= status["oldest_queued_age"] < 60
    text = cli("status", worker_url)
    assert text.returncode == 0 and "oldest queued" in text.stdout and "workers seen" in text.stdout
    task = cli_json("inspect", worker_url, f"{job_id}-1")
    assert (task["state"], task["attempts"], task["job_name"]) == ("queued", 0, "pipeline")
    payload = task["payload"]
    assert payload["function"] == "nbq_cli_steps:scale" and payload["signature"] == "ok"
    assert "f" not in payload["header"] and payload["header"]["t"] == f"{job_id}-1"

    worker = cli("worker", worker_url, "--burst", "--only-by-reference")
    assert worker.returncode == 0, worker.stderr

    job = cli_json("job", worker_url, job_id, code=1)
    assert (job["name"], job["total"], job["completed"], job["dead"]) == ("pipeline", 3, 2, 1)
    assert job["created"] <= job["first_started"] <= job["last_finished"]
    (error,) = job["errors"]
    assert (error["task_id"], error["type"], error["message"]) == (f"{job_id}-2", "Terminal", "planted")
    shown = cli("job", worker_url, job_id).stdout
    assert "1 attempt(s)" in shown and "ran by         1 worker(s)" in shown and "0 running" in shown
    assert len(job["workers"]) == 1 and job["running_now"] == 0  # the burst worker, gone by now

    out = cli("results", worker_url, job_id)
    assert out.returncode == 1, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    keys = {"task_id", "job_id", "success", "result", "error", "attempts", "started", "finished"}
    assert all(set(row) == keys and row["job_id"] == job_id for row in rows)
    assert [row["result"] for row in rows] == [2, {"__bytes__": "bmJuYm5i"}, None]
    assert [row["success"] for row in rows] == [True, True, False] and rows[2]["error"]["type"] == "Terminal"
    pickled = tmp_path / "values.pkl"
    assert cli("results", worker_url, job_id, "--pickle", "--out", str(pickled)).returncode == 1
    values = dill.loads(pickled.read_bytes())
    assert values[:2] == [2, b"nbnbnb"] and values[2].type == "Terminal"

    dead = cli_json("inspect", worker_url, f"{job_id}-2", code=1)
    assert (dead["state"], dead["attempts"], dead["error"]["message"]) == ("dead", 1, "planted")
    done = cli_json("inspect", worker_url, f"{job_id}-0")
    assert (done["state"], done["payload"], done["error"]) == ("completed", None, None)
    assert [row["type"] for row in cli_json("dlq", "list", worker_url)] == ["Terminal"]
    assert [row["name"] for row in cli_json("jobs", worker_url)] == ["pipeline"]
    assert cli_json("release", worker_url) == {"released": 0}
    assert cli_json("rezero", worker_url)["completed"] == 2

    refused = cli("purge", worker_url)
    assert refused.returncode == 2 and "without --yes" in refused.stderr
    assert cli("purge", worker_url, "--yes").returncode == 0
    assert cli_json("status", worker_url)["inserted"] == 0


@pytest.mark.slow
def test_status_shows_live_workers_and_leases_and_cp_waits_for_them(worker_url, steps, tmp_path):
    job_id = cli(
        "insert", worker_url, "-", stdin='{"fn": "nbq_cli_steps:nap", "args": [5]}\n'
    ).stdout.strip()  # long enough for the status and cp commands below to run while it does
    (worker,) = start_workers(worker_url, 1, "--lease", "3")
    try:
        status = wait_for(
            lambda: (s := cli_json("status", worker_url))["leases_expiring"] and s["workers"] and s,
            what="a lease and a heartbeat",
        )
        ((lease,), (seen,)) = status["leases_expiring"], status["workers"]
        assert lease["task_id"] == f"{job_id}-0" and 0 < lease["expires_in"] <= 3
        assert seen["pid"] == worker.pid and seen["lease"] == 3 and seen["only_by_reference"] is False
        copy = cli("cp", worker_url, f"fq://{tmp_path / 'copy'}")
        assert copy.returncode == 2 and "leased" in copy.stderr and copy.stderr.count("\n") == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        codes = wait_all([worker], timeout=30)  # always reaped, even when an assertion failed
    assert codes == [0]
    status = cli_json("status", worker_url)
    assert status["workers"] == [] and status["completed"] == 1  # it finished the task, then withdrew


def test_cp_and_mv_round_trip_between_backends(tmp_path, redis_url):
    nb = notebook(NOTEBOOK)
    source_url, final_url = f"fq://{tmp_path / 'source'}", f"fq://{tmp_path / 'final'}"
    source = TaskQueue(source_url)
    ran = source.insert([functools.partial(nb.double, i) for i in range(5)] + [nb.refuse] * 2, progress=False)
    assert wait_all(start_workers(source_url, 1, "--burst"), timeout=60) == [0]
    assert source.purge_dead([f"{ran.id}-6"]) == 1  # its error record stays with the job
    waiting = source.insert([functools.partial(nb.double, i) for i in (10, 11, 12)], progress=False)
    before = source.status()

    report = cli_json("cp", source_url, redis_url)
    assert {k: report[k] for k in ("jobs", "functions", "queued", "leased", "completed", "dead")} == {
        "jobs": 2,
        "functions": 2,
        "queued": 3,
        "leased": 0,
        "completed": 5,
        "dead": 1,
    }
    assert source.status() == before  # cp leaves the source as it was
    copied = TaskQueue(redis_url)
    counts = copied.status()
    assert (counts.inserted, counts.queued, counts.completed, counts.dead, counts.failed) == (10, 3, 5, 1, 0)
    ran_counts = copied.job(ran.id).counts()
    assert (ran_counts.inserted, ran_counts.completed, ran_counts.dead) == (7, 5, 2)
    values = copied.job(ran.id).results(on_error="exception")
    assert values[:5] == [0, 2, 4, 6, 8] and [e.type for e in values[5:]] == ["Terminal", "Terminal"]
    assert [d.task_id for d in copied.dead()] == [f"{ran.id}-5"]
    again = cli("cp", source_url, redis_url)
    assert again.returncode == 2 and f"already has job {ran.id}" in again.stderr

    moved = cli("mv", redis_url, final_url)
    assert moved.returncode == 0, moved.stderr
    assert copied.status().inserted == 0 and copied.jobs() == []
    final = TaskQueue(final_url)
    assert final.redrive() == 1  # a dead letter is signed again for its new queue too
    assert wait_all(start_workers(final_url, 1, "--burst"), timeout=60) == [0]  # function blobs came along
    (letter,) = final.dead()
    assert b"Terminal" in letter.error and b"signed for queue" not in letter.error
    assert final.job(waiting.id).wait(timeout=30, progress=False).results() == [20, 22, 24]
    assert final.job(ran.id).results(on_error="none")[:5] == [0, 2, 4, 6, 8]

    memory = TaskQueue("mem://cli-copy")
    assert copy_queue(final, memory).completed == 8
    assert memory.job(waiting.id).results() == [20, 22, 24] and memory.status().dead == 1


def test_insert_checks_every_line_before_queueing_anything(steps, tmp_path):
    url = str(tmp_path / "queue")  # no scheme: an fq:// path
    specs = write_specs(
        tmp_path / "specs.jsonl",
        {"fn": "nbq_cli_steps:scale", "args": [1]},
        {"fn": "nbq_cli_steps:scale", "args": [1, 2, 3]},
    )
    out = cli("insert", url, specs)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "specs.jsonl line 2: scale(): too many positional arguments" in out.stderr
    assert cli_json("status", url)["inserted"] == 0
    out = cli("insert", url, "-", stdin='{"fn": "nbq_cli_steps:scale", "args": [4]}\n')
    assert out.returncode == 0 and re.fullmatch(r"[0-9a-f]+_[0-9a-f]+\n", out.stdout)
    assert cli_json("status", url)["queued"] == 1


def test_usage_and_connection_errors_are_one_line_with_exit_code_2(tmp_path):
    url = f"fq://{tmp_path / 'queue'}"
    for args, message in [
        (("status", "nope://x"), "unknown queue scheme"),
        (("status", "redis://127.0.0.1:1/0?queue=q"), "cannot reach redis"),
        (("job", url, "nojob"), "no job 'nojob'"),
        (("inspect", url, "nojob-0"), "no task 'nojob-0'"),
        (("insert", url, str(tmp_path / "missing.jsonl")), "No such file"),
    ]:
        out = cli(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    debug = cli("status", "nope://x", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert cli("jobs").returncode == 2  # argparse: a missing URL


def readme_blocks() -> list[str]:
    """The ```bash blocks of the README's "Command line" section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_readme_command_line_examples_run(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) >= 2
    shim = tmp_path / "bin" / "nbqueue"  # the console script, as `pip install` makes it
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}:$PYTHONPATH" exec {sys.executable} -m nbqueue "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    # One shell, as a reader would type them: later blocks use what earlier ones set.
    script = "\n".join(f"{block}\necho '--- block {n} ok'" for n, block in enumerate(blocks))
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env={**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert out.stdout.count("--- block") == len(blocks)
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert [row["result"] for row in rows] == [42, {"__bytes__": "bmJuYm5i"}]
    assert out.stdout.count('"result": 42') == 1  # the last block reads them from the moved queue


def test_a_forced_copy_queues_leased_tasks_again(tmp_path):
    from nbqueue import TransferRefused

    nb = notebook(NOTEBOOK)
    source = TaskQueue(f"fq://{tmp_path / 'source'}")
    job = source.insert([functools.partial(nb.double, i) for i in range(3)], progress=False)
    (lease,) = source.backend.lease(1, 60)
    destination = TaskQueue("mem://forced-copy")
    with pytest.raises(TransferRefused, match="1 task\\(s\\) leased"):
        copy_queue(source, destination)
    assert destination.status().inserted == 0
    report = copy_queue(source, destination, force=True)
    assert (report.queued, report.leased) == (2, 1)
    assert destination.status().queued == 3 and source.status().leased == 1  # the source is untouched
    destination.poll(burst=True)
    assert destination.job(job.id).results() == [0, 2, 4]
    assert source.backend.complete([(lease.task_id, lease.token, b"late")]) == [True]


def test_inspect_names_a_pickled_tasks_function_by_digest_and_loads_nothing(tmp_path):
    nb = notebook(NOTEBOOK)
    url = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(url)
    tampered = tq.insert([functools.partial(nb.double, 1)], progress=False)
    (segment,) = (tmp_path / "queue" / "queue").iterdir()
    blob = bytearray(segment.read_bytes())
    blob[-40] ^= 0x01  # one bit inside the signed envelope
    segment.write_bytes(bytes(blob))
    genuine = tq.insert([functools.partial(nb.double, 2)], progress=False)
    (digest,) = [digest for digest, _ in tq.backend.iter_functions()]

    payload = cli_json("inspect", url, f"{genuine.id}-0")["payload"]
    assert payload["kind"] == "pickled arguments" and payload["header"]["f"] == digest
    assert payload["function"].startswith(f"digest {digest} (") and payload["signature"] == "ok"
    payload = cli_json("inspect", url, f"{tampered.id}-0")["payload"]
    assert payload["signature"].startswith("bad: bad signature") and "header" not in payload
    assert "signature bad" in cli("inspect", url, f"{tampered.id}-0").stdout
