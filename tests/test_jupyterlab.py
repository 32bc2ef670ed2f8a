"""The job widget in a real JupyterLab, driven by headless Chromium (Playwright).

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
test extra (jupyterlab, playwright). Playwright drives the system Chromium: no browser
download.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from .helpers import CHROMIUM_ARGS, JupyterProcess, chromium_path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.slow


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a free loopback port with a token, serving copies of the notebooks."""
    chromium = chromium_path()
    for name in ("quickstart.ipynb", "cell_magic.ipynb"):
        shutil.copy(NOTEBOOKS / name, tmp_path)
    # Workspaces in the test's directory, not the user's settings: each test starts clean.
    workspaces = f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"
    lab = JupyterProcess("jupyterlab", str(tmp_path), "--expose-app-in-browser", workspaces)
    try:
        lab.wait_ready()
        yield lab.base, lab.token, chromium, tmp_path
    finally:
        lab.stop()


def run_all_cells(page, base: str, token: str, notebook: str) -> None:
    """Open ``notebook`` in JupyterLab, wait for an idle kernel, and run every cell.

    A workspace of its own, reset: JupyterLab otherwise restores the documents an earlier test
    left open (its workspaces live in the user's settings), and "run all" would run another one.
    """
    import uuid

    page.goto(f"{base}/lab/workspaces/{uuid.uuid4().hex}/tree/{notebook}?token={token}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(
        "(name) => { const w = window.jupyterapp.shell.currentWidget;"
        " return w && w.context && w.context.path === name && w.sessionContext"
        " && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.status === 'idle'; }",
        arg=notebook,
        timeout=60_000,
    )
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def test_job_widget_renders_and_updates_live_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token, chromium, workdir = jupyterlab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            run_all_cells(page, base, token, "quickstart.ipynb")
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
            # Task 13 fails, waits out its backoff, runs again: the view says so meanwhile.
            assert any("waiting to retry" in s and "failed attempt(s)" in s for s in seen), seen
            assert "3 failed attempt(s)" in seen[-1] and re.search(r"ran by [12] worker\(s\)", seen[-1]), seen
            assert not any("ran by 0 worker(s)" in s for s in seen if "0/200" not in s), seen
            error_title = page.locator(
                ".jupyter-widget-Collapse-header, .p-Collapse-header, .lm-Collapse-header",
                has_text="latest error",
            ).first
            assert "13 is unlucky" in error_title.inner_text()
            error_title.click()  # open it: the traceback starts at score, then what it printed
            trace = page.locator(".widget-html-content", has_text="its output").first
            trace.wait_for(timeout=10_000)
            shown = trace.inner_text()
            assert "in score" in shown and "worker.py" not in shown and "scoring 13" in shown, shown
            button = page.get_by_role("button", name="Load results")
            button.wait_for(timeout=30_000)
            assert button.is_enabled()
            button.click()
            page.locator(".widget-html-content", has_text="results in job_results").first.wait_for(
                timeout=30_000
            )
            page.screenshot(path=str(workdir / "jupyterlab-widget.png"), full_page=False)
            # The same server's dashboard lists the kernel's queue; a traceback opened there
            # stays open while the page refreshes.
            board = browser.new_page(viewport={"width": 1200, "height": 900})
            board.goto(f"{base}/nbqueue?token={token}")
            board.locator("h2", has_text="queues/quickstart").wait_for(timeout=30_000)
            opened = board.locator("details.error summary", has_text="13 is unlucky").first
            opened.click()
            board.wait_for_timeout(3000)
            kept = board.locator("details.error[open]")
            assert kept.count() == 1 and "scoring 13" in kept.first.inner_text()
        finally:
            browser.close()


def test_a_scikit_learn_grid_runs_from_a_cell_in_jupyterlab(jupyterlab):
    """The walk that used to fail: a notebook helper calling from-imported cross_val_score,
    fanned out with %%queue over C and gamma, in JupyterLab with its kernel."""
    from playwright.sync_api import sync_playwright

    base, token, chromium, workdir = jupyterlab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            started = time.monotonic()
            run_all_cells(page, base, token, "cell_magic.ipynb")
            best = page.locator(".jp-OutputArea-output", has_text="best SVC accuracy:").first
            best.wait_for(timeout=240_000)
            print(f"\ncell_magic.ipynb ran in JupyterLab in {time.monotonic() - started:.1f}s")
            assert 0.5 < float(best.inner_text().split()[-1]) <= 1.0
            explained = page.locator(".jp-OutputArea-output", has_text="fit_eval: ").first.inner_text()
            assert "sklearn.model_selection._validation.cross_val_score" in explained
            assert not page.locator(".jp-OutputArea-output", has_text="SerializationError").count()
            page.screenshot(path=str(workdir / "jupyterlab-sklearn.png"), full_page=False)
        finally:
            browser.close()
