"""The job widget in a real JupyterLab, driven by headless Chromium (Playwright).

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
test extra (jupyterlab, playwright). Playwright drives the system Chromium: no browser
download.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from .helpers import CHROMIUM_ARGS, JupyterProcess, chromium_path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.slow


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a free loopback port with a token, serving a copy of the quickstart."""
    chromium = chromium_path()
    shutil.copy(NOTEBOOKS / "quickstart.ipynb", tmp_path)
    lab = JupyterProcess("jupyterlab", str(tmp_path), "--expose-app-in-browser")
    try:
        lab.wait_ready()
        yield lab.base, lab.token, chromium, tmp_path
    finally:
        lab.stop()


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
            assert seen and "200/200 done · 1 dead · 0 running · 0 queued" in seen[-1], seen
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
