"""The job view: text everywhere, a widget whose thread stops when the job ends or it closes."""

from __future__ import annotations

import functools
import threading

from nbqueue import TaskQueue
from nbqueue.progress import JobView

from .helpers import LOCKED_MODEL_SOURCE, notebook, run_python, wait_for

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
    tq.poll(burst=True)
    text = view.refresh_text()
    assert "6/6 done · 1 dead · 0 running · 0 queued" in text
    assert "finished in" in text and "5 completed, 1 dead" in text
    assert "latest error: " in text and "Terminal: three is not allowed" in text


def test_widget_thread_stops_when_the_job_ends_and_text_plain_is_the_text_view():
    nb = notebook(NB)
    tq = TaskQueue("mem://widget-view")
    job = tq.insert((functools.partial(nb.half, i) for i in range(6)), progress=False)
    view = JobView(job)
    widget = view.widget
    view.start()
    assert progress_threads()
    tq.poll(burst=True)
    wait_for(lambda: not progress_threads(), timeout=5, what="the updater to stop")  # none leaked
    bundle = widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "6/6 done · 1 dead" in bundle["text/plain"]
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
tq.poll(burst=True)
job.wait()
""",
        f"fq://{tmp_path / 'q'}",
    )
    assert done.returncode == 0, done.stderr
    assert "insert" in done.stderr and "40/40" in done.stderr
    last = done.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "40/40" in last


UNSHIPPABLE = (
    LOCKED_MODEL_SOURCE
    + """
from nbqueue import queueable

@queueable
def half(i):
    return fit_with(i)[1] / 2

@queueable
def takes(x):
    return x
"""
)


def test_an_insert_that_fails_before_queuing_shows_nothing_and_leaves_no_thread(monkeypatch):
    import pytest

    from nbqueue import SerializationError

    monkeypatch.setattr("nbqueue.progress.detect_mode", lambda: "widget")  # as in a kernel
    nb = notebook(UNSHIPPABLE)
    tq = TaskQueue("mem://failed-insert")
    with pytest.raises(SerializationError, match="fit_with → model → _lock: a lock belongs"):
        tq.insert(functools.partial(nb.half, i) for i in range(3))
    assert not progress_threads()
    assert tq.jobs() == [] and tq.status().inserted == 0


def test_an_insert_that_fails_part_way_draws_the_failure_and_stops_its_thread(monkeypatch):
    import pytest

    from nbqueue import SerializationError

    monkeypatch.setattr("nbqueue.progress.detect_mode", lambda: "widget")  # as in a kernel
    nb = notebook(UNSHIPPABLE)
    tq = TaskQueue("mem://failed-part-way")
    tasks = [functools.partial(nb.takes, i) for i in range(10)] + [
        functools.partial(nb.takes, threading.Lock())
    ]
    with pytest.raises(SerializationError, match="argument 0: a lock belongs"):
        tq.insert(tasks, batch_size=5)
    assert not progress_threads()  # the final state is drawn; the updater does not poll on
    (job,) = tq.jobs()
    assert job.total == 10
    text = JobView(job).refresh_text()
    assert "insert failed after 10 queued: SerializationError" in text


def test_the_widgets_cancel_button_cancels_the_job_and_the_view_shows_it():
    nb = notebook(NB)
    tq = TaskQueue("mem://cancel-view")
    job = tq.insert((functools.partial(nb.half, i) for i in range(5)), progress=False)
    view = JobView(job)
    widget = view.widget
    cancel = view._parts["cancel"]
    assert cancel.layout.display != "none"
    cancel.click()  # as the user's click does
    assert job.counts().cancelled == 5 and job.done()
    assert cancel.disabled and "5 waiting task(s) ended" in cancel.description
    view.refresh(force=True)
    assert cancel.layout.display == "none"  # finished: nothing left to cancel
    text = widget._repr_mimebundle_()["text/plain"]
    assert "5/5 done · 0 dead · 5 cancelled" in text and "0 completed, 0 dead, 5 cancelled" in text
    view.stop()
    widget.close()


RETRIED = """
from nbqueue import queueable, current_task, Terminal

@queueable
def flaky(i):
    print(f"task {i} attempt {current_task().attempt}")
    if i == 1 and current_task().attempt == 1:
        raise ConnectionError("the service hiccupped")
    if i == 2:
        raise Terminal("two is refused")
    return i
"""


def test_the_view_shows_a_retry_as_it_waits_and_a_failure_with_its_output():
    nb = notebook(RETRIED)
    tq = TaskQueue("mem://retried-view")
    job = tq.insert((functools.partial(nb.flaky, i) for i in range(3)), progress=False)
    view = JobView(job)
    widget = view.widget
    tq.poll(burst=True, max_tasks=3)  # each ran once: task 1 now waits out its retry backoff
    text = view.refresh_text()
    assert "2/3 done · 1 dead · 0 running · 0 queued · 1 waiting to retry · 2 failed attempt(s)" in text, text
    view.refresh(force=True)
    # An unnamed job is named by its id: the title shows it once.
    assert view._parts["title"].value.count(job.id) == 1
    trace = view._parts["trace"].value
    assert "Terminal: two is refused" in trace and "task 2 attempt 1" in trace  # what it printed
    tq.poll(burst=True)  # the retry: it succeeds
    assert "3/3 done" in view.refresh_text() and job.output(1) == "task 1 attempt 2\n"
    widget.close()
