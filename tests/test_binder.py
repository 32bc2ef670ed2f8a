"""binder/start starts Redis, points the notebooks at it, and execs its arguments."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .redis_server import free_port

START = Path(__file__).resolve().parent.parent / "binder" / "start"


def test_binder_start_runs_redis_and_execs_its_arguments(tmp_path):
    port = free_port()  # never the shared default port
    env = {**os.environ, "NBQUEUE_REDIS_PORT": str(port), "NBQUEUE_REDIS_DIR": str(tmp_path)}
    env.pop("NBQUEUE_URL", None)
    try:
        done = subprocess.run(
            [str(START), "python", "-c",
             "import os, sys; from nbqueue import TaskQueue; "
             "tq = TaskQueue(os.environ['NBQUEUE_URL']); print(tq.url, tq.status().inserted, sys.argv[1:])",
             "one", "two"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [f"redis://127.0.0.1:{port}/0?queue=binder", "0", "['one',", "'two']"]
    finally:
        pidfile = tmp_path / "redis.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_binder_files_install_nbqueue_and_redis():
    binder = START.parent
    assert "redis-server" in (binder / "apt.txt").read_text().split()
    assert "pip install" in (binder / "postBuild").read_text() and os.access(binder / "postBuild", os.X_OK)
    assert (binder / "start").read_text().rstrip().endswith('exec "$@"')
