"""The job view: text everywhere, a widget whose thread stops when the job ends or it closes."""

from __future__ import annotations

import functools
import threading

from nbqueue import TaskQueue
from nbqueue.progress import JobView

from .helpers import notebook, run_python, wait_for

NB = """
from nbqueue import queueable, Terminal

@queueable
def half(i):
    if i == 3:
        raise Terminal("three is not allowed")
    return i / 2
"""


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbqueue-progress")]


def test_text_view_shows_final_counts_and_the_latest_error():
    nb = notebook(NB)
    tq = TaskQueue("mem://text-view")
    job = tq.insert((functools.partial(nb.half, i) for i in range(6)), progress=False)
    view = JobView(job)
    assert "0/6 done" in view.refresh_text()
    tq.poll()
    text = view.refresh_text()
    assert "6/6 done · 1 failed · 0 running · 0 queued" in text
    assert "finished in" in text and "5 completed, 1 failed" in text
    assert "latest error: " in text and "Terminal: three is not allowed" in text


def test_widget_thread_stops_when_the_job_ends_and_text_plain_is_the_text_view():
    nb = notebook(NB)
    tq = TaskQueue("mem://widget-view")
    job = tq.insert((functools.partial(nb.half, i) for i in range(6)), progress=False)
    view = JobView(job)
    widget = view.widget
    view.start()
    assert progress_threads()
    tq.poll()
    wait_for(lambda: not progress_threads(), timeout=5, what="the updater to stop")  # none leaked
    bundle = widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "6/6 done · 1 failed" in bundle["text/plain"]
    assert "three is not allowed" in view._parts["error"].get_title(0)
    assert view._parts["button"].disabled is False  # "Load results" once finished
    widget.close()


def test_closing_the_widget_stops_its_thread():
    nb = notebook(NB)
    tq = TaskQueue("mem://closed-view")
    job = tq.insert((functools.partial(nb.half, i) for i in range(4)), progress=False)
    view = JobView(job)
    widget = view.widget  # built, so closing it is what stops the thread
    view.start()
    assert progress_threads(), "the updater thread should be running before the widget closes"
    widget.close()
    wait_for(lambda: not progress_threads(), timeout=3, what="the updater to stop")


def test_text_bar_in_a_non_interactive_run_ends_on_the_final_count(tmp_path):
    done = run_python(
        """
import functools, sys
from nbqueue import TaskQueue, queueable

@queueable
def inc(i):
    return i + 1

tq = TaskQueue(sys.argv[1])
job = tq.insert(functools.partial(inc, i) for i in range(40))
tq.poll()
job.wait()
""",
        f"fq://{tmp_path / 'q'}",
    )
    assert done.returncode == 0, done.stderr
    assert "insert" in done.stderr and "40/40" in done.stderr
    last = done.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "40/40" in last
