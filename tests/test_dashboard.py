"""The dashboard page in real headless Chromium against a real jupyter-server with a token, and
the kernel-side client asking that server for workers."""

from __future__ import annotations

import functools
import json
import re
import time

import pytest

from nbqueue import TaskQueue
from nbqueue.server.client import running_server, start_server_workers, stop_server_workers

from .helpers import CHROMIUM_ARGS, JupyterProcess, chromium_path, notebook

pytestmark = pytest.mark.slow

NB = """
import time
from nbqueue import queueable, Terminal

@queueable
def pause(i, seconds):
    time.sleep(seconds)
    return i

@queueable
def cube(i):
    if i == 7:
        print("cubing", i, "of the reserved kind")
        raise Terminal("seven is reserved")
    return i ** 3
"""


@pytest.fixture
def server(tmp_path):
    url = f"fq://{tmp_path / 'queue'}"
    config = tmp_path / "jupyter_server_config.json"
    config.write_text(json.dumps({
        "ServerApp": {"jpserver_extensions": {"nbqueue": True}},
        "NbQueue": {"queues": [url]},
    }))  # fmt: skip
    proc = JupyterProcess("jupyter_server", str(tmp_path), f"--config={config}")
    try:
        yield proc.wait_ready(), url, tmp_path
    finally:
        proc.stop()


def test_dashboard_shows_counts_jobs_errors_and_redrives(server):
    from playwright.sync_api import sync_playwright

    proc, url, tmp_path = server
    nb = notebook(NB)
    job = TaskQueue(url).insert(
        (functools.partial(nb.cube, i) for i in range(30)), name="cubes", progress=False
    )
    info = running_server(pid=proc.proc.pid)  # what a kernel under this server finds
    assert info is not None and info["token"] == proc.token
    pids = start_server_workers(info, url, 1)
    assert len(pids) == 1
    deadline = time.monotonic() + 60
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.done()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{proc.base}/nbqueue?token={proc.token}")
            page.locator(".job-line", has_text="30/30 done · 1 dead").wait_for(timeout=30_000)
            counts = page.locator(".queue-counts").first.inner_text()
            assert "completed 29" in counts and "dead 1" in counts
            assert "cubes" in page.locator("tr.job").first.inner_text()
            error = page.locator("details.error summary").first.inner_text()
            assert "Terminal: seven is reserved" in error
            page.locator("details.error summary").first.click()  # the row opens: what it printed
            assert "cubing 7 of the reserved kind" in page.locator("details.error pre").first.inner_text()
            assert f"pid {pids[0]}" in page.locator("#workers").inner_text()
            page.get_by_role("button", name="Redrive 1 dead letter(s)").click()
            # The redriven task runs again on the server's worker, fails again, and is counted.
            page.locator(".queue-counts", has_text="failed attempts 2").wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"))
        finally:
            browser.close()
    assert stop_server_workers(info, pids) == 1


def test_the_page_updates_in_place_and_keeps_what_the_user_opened(server):
    """An open traceback stays open across refreshes while a job beside it runs; that job's state,
    rate and chart move; a job's detail lists its errors with what they printed, and retries."""
    from playwright.sync_api import sync_playwright

    proc, url, tmp_path = server
    nb = notebook(NB)
    tq = TaskQueue(url)
    cubes = tq.insert((functools.partial(nb.cube, i) for i in range(10)), name="cubes", progress=False)
    info = running_server(pid=proc.proc.pid)
    pids = start_server_workers(info, url, 1)
    deadline = time.monotonic() + 60
    while not cubes.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    slow = tq.insert((functools.partial(nb.pause, i, 0.15) for i in range(40)), name="slow", progress=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{proc.base}/nbqueue?token={proc.token}")
            row = page.locator(f"tr.job[data-job='{slow.id}']")
            row.locator(".job-state", has_text="running").wait_for(timeout=30_000)
            page.locator("details.error summary").first.click()
            chart = row.locator(".chart polyline")
            chart.wait_for(timeout=10_000)
            before = chart.get_attribute("points")
            page.wait_for_timeout(3000)  # three refreshes, while the slow job's row changes
            assert page.locator("details.error[open]").count() == 1  # still open
            assert "cubing 7 of the reserved kind" in page.locator("details.error[open] pre").inner_text()
            assert chart.get_attribute("points") != before  # the chart moved
            assert "tasks/s" in row.locator(".rate").inner_text() and "ETA" in row.inner_text()
            # One single-slot worker: never more than one task running, the rest prefetched.
            queue_line = page.locator(".queue-counts").first.inner_text()
            assert int(re.search(r"running (\d+)", queue_line).group(1)) <= 1, queue_line
            assert int(re.search(r"(\d+) running", row.locator(".job-line").inner_text()).group(1)) <= 1
            row.locator(".job-state", has_text="finished").wait_for(timeout=60_000)
            # The finished job with a failure: its detail, and a retry of what failed.
            cubes_row = page.locator(f"tr.job[data-job='{cubes.id}']")
            assert cubes_row.locator(".job-state").inner_text() == "finished"
            cubes_row.locator(".job-name").click()
            detail = page.locator(f"tr.job-detail[data-detail='{cubes.id}']")
            detail.locator("details.error summary", has_text="Terminal: seven is reserved").click()
            assert "cubing 7 of the reserved kind" in detail.locator("details.error pre").inner_text()
            cubes_row.get_by_role("button", name="Retry failed").click()
            page.locator(".queue-counts", has_text="failed attempts 2").wait_for(timeout=30_000)
        finally:
            browser.close()
    assert stop_server_workers(info, pids) == 1


def test_the_cancel_button_on_a_job_row_cancels_it(server):
    from playwright.sync_api import sync_playwright

    proc, url, tmp_path = server
    nb = notebook(NB)
    job = TaskQueue(url).insert(
        (functools.partial(nb.cube, i) for i in range(12)), name="waiting", progress=False
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{proc.base}/nbqueue?token={proc.token}")
            row = page.locator("tr.job", has_text="waiting")
            row.get_by_role("button", name="Cancel").click()
            page.locator(".job-line", has_text="12/12 done · 0 dead · 12 cancelled").wait_for(timeout=30_000)
            assert row.get_by_role("button", name="Cancel").count() == 0  # a finished job has none
        finally:
            browser.close()
    assert job.counts().cancelled == 12 and job.done()


def test_a_new_kernel_finds_and_stops_the_server_workers_an_old_one_started(tmp_path, monkeypatch, capsys):
    """Server-owned workers outlive the kernel that asked for them: after a restart (a new
    shell), ``%queue workers`` lists them and ``%queue workers stop`` stops them; with
    ``worker_idle_exit`` they exit by themselves once idle."""
    from IPython.core.interactiveshell import InteractiveShell

    url = f"fq://{tmp_path / 'queue'}"
    config = tmp_path / "jupyter_server_config.json"
    config.write_text(json.dumps({
        "ServerApp": {"jpserver_extensions": {"nbqueue": True}},
        "NbQueue": {"queues": [url], "worker_idle_exit": 4},
    }))  # fmt: skip
    proc = JupyterProcess("jupyter_server", str(tmp_path), f"--config={config}").wait_ready()
    monkeypatch.setenv("JPY_PARENT_PID", str(proc.proc.pid))  # as the server sets it for its kernels
    monkeypatch.chdir(tmp_path)

    def new_kernel():
        InteractiveShell.clear_instance()
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "nbqueue")
        return shell

    try:
        first = new_kernel()
        first.run_line_magic("queue", f"workers start 2 {url}")
        assert "owned by the Jupyter server" in capsys.readouterr().out
        second = new_kernel()  # the kernel restarted: it started nothing itself
        second.run_line_magic("queue", "workers")
        listing = capsys.readouterr().out
        assert listing.count("owned by the Jupyter server") == 2
        second.run_line_magic("queue", "workers stop")
        assert "stopped 2 worker(s)" in capsys.readouterr().out
        second.run_line_magic("queue", "workers")
        assert "no live workers" in capsys.readouterr().out
        # Idle workers exit by themselves after worker_idle_exit seconds.
        second.run_line_magic("queue", f"workers start 1 {url}")
        capsys.readouterr()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            second.run_line_magic("queue", "workers")
            if "no live workers" in capsys.readouterr().out:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("an idle server-owned worker did not exit after worker_idle_exit")
    finally:
        InteractiveShell.clear_instance()
        proc.stop()


def test_the_dashboard_lists_the_queues_its_kernels_use(server, monkeypatch):
    """A %%queue cell's queue, and one a kernel inserts into itself, which the server was never
    configured with, show on its dashboard: the kernel tells the server it runs under."""
    from IPython.core.interactiveshell import InteractiveShell
    from playwright.sync_api import sync_playwright

    proc, url, tmp_path = server
    monkeypatch.setenv("JPY_PARENT_PID", str(proc.proc.pid))  # as the server sets it for its kernels
    monkeypatch.chdir(tmp_path)
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "nbqueue")
        shell.run_cell("%%queue fq://./sweep --map alpha=[1, 2]\nalpha * 2")
        shell.run_cell("from nbqueue import TaskQueue\nTaskQueue('fq://./plain').insert([], progress=False)")
        sweep, plain = f"fq://{tmp_path / 'sweep'}", f"fq://{tmp_path / 'plain'}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(f"{proc.base}/nbqueue?token={proc.token}")
                page.locator("h2", has_text=sweep).wait_for(timeout=30_000)
                page.locator("h2", has_text=plain).wait_for(timeout=30_000)  # an insert of its own
                assert page.locator("h2", has_text=url).count() == 1  # beside the configured one
                section = page.locator(f"h2:has-text('{sweep}') + .queue-counts")
                assert "inserted 2" in section.inner_text()
            finally:
                browser.close()
    finally:
        InteractiveShell.clear_instance()
