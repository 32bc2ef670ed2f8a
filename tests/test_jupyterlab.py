"""The job widget in a real JupyterLab, driven by headless Chromium (Playwright).

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
test extra (jupyterlab, playwright). Playwright drives the system Chromium: no browser
download.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free loopback port with a token, serving a copy of the notebooks."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not on PATH; install it: apt-get install chromium", pytrace=False)
    shutil.copy(NOTEBOOKS / "quickstart.ipynb", tmp_path)
    port, token = free_port(), uuid.uuid4().hex
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--expose-app-in-browser",
    ]  # fmt: skip
    if os.geteuid() == 0:  # CI machines run as root; JupyterLab refuses that without this flag
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield base, token, chromium, tmp_path
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_job_widget_renders_and_updates_live_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token, chromium, workdir = jupyterlab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_function(
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
                " && w.sessionContext.session.kernel.status === 'idle'; }",
                timeout=60_000,
            )
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            # Sample the widget while the job runs: its counts must change in place.
            seen: list[str] = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stats = page.locator(".widget-html-content", has_text="done ·").first
                if stats.count():
                    text = stats.inner_text()
                    if not seen or seen[-1] != text:
                        seen.append(text)
                    if "200/200 done" in text:
                        break
                time.sleep(0.1)
            assert seen and "200/200 done · 1 failed · 0 running · 0 queued" in seen[-1], seen
            assert any("200/200" not in s for s in seen), f"no intermediate state was drawn: {seen}"
            error_title = page.locator(
                ".jupyter-widget-Collapse-header, .p-Collapse-header, .lm-Collapse-header",
                has_text="latest error",
            ).first
            assert "13 is unlucky" in error_title.inner_text()
            button = page.get_by_role("button", name="Load results")
            button.wait_for(timeout=30_000)
            assert button.is_enabled()
            button.click()
            page.locator(".widget-html-content", has_text="results in job_results").first.wait_for(
                timeout=30_000
            )
            page.screenshot(path=str(workdir / "jupyterlab-widget.png"), full_page=False)
        finally:
            browser.close()
