"""Progress displays: one view of a job, drawn as a live widget in a notebook or as text.

The environment is detected once: inside a Jupyter kernel with ipywidgets the view is a widget,
anywhere else (terminals, scripts, a kernel without ipywidgets) it is text.
``NBQUEUE_PROGRESS=widget|text|off`` overrides the detection.

A widget's ``text/plain`` is the text view, so a saved notebook reads correctly anywhere. A
background thread updates the widget's traits at most four times a second and never prints or
displays (output from a thread lands in whatever cell is running). Whoever waits (``insert``,
``Job.wait``) refreshes the view from its own thread and, at the end, re-sends the display by
its display id: papermill and nbclient keep only what the running cell emits, and they apply
that update to the output where the view was first shown, so the saved notebook ends with the
final state.
"""

from __future__ import annotations

import functools
import html
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .backends.base import Counts
from .defaults import ENV_PROGRESS, REFRESH_SECONDS

if TYPE_CHECKING:
    from .records import TaskError

COLORS = {
    "completed": "#2e7d32",
    "dead": "#c62828",
    "cancelled": "#8d6e63",
    "running": "#1565c0",
    "prefetched": "#90caf9",
    "queued": "#bdbdbd",
    "scheduled": "#e0e0e0",
    "waiting to retry": "#ffb74d",
}

_detected: str | None = None


def detect_mode() -> str:
    """``widget`` inside a Jupyter kernel that has ipywidgets, else ``text`` (detected once)."""
    global _detected
    if _detected is None:
        _detected = "text"
        shell = _ipython()
        if shell is not None and hasattr(shell, "kernel"):
            try:
                import ipywidgets  # noqa: F401
            except ImportError:
                pass
            else:
                _detected = "widget"
    return _detected


def progress_mode() -> str:
    """``widget``, ``text`` or ``off``: the override if set, else the detected environment."""
    mode = os.environ.get(ENV_PROGRESS, "").strip().lower()
    if mode in ("widget", "text", "off"):
        return "text" if mode == "widget" and detect_mode() != "widget" else mode
    return detect_mode()


def _ipython() -> Any:
    if "IPython" not in sys.modules:  # never import IPython just to ask
        return None
    from IPython import get_ipython

    return get_ipython()


# -- text ----------------------------------------------------------------------------------------
def running_shown(counts: Counts, running: int | None) -> int:
    """What a view calls running: the tasks executing now by the workers' heartbeats (which lag
    the counters, so never more than the leased ones), or every leased task when not known."""
    return counts.leased if running is None else min(running, counts.leased)


def describe(counts: Counts, total: int | None, running: int | None = None, retrying: bool = False) -> str:
    """One line: ``done/total, dead, running, queued`` (and ``cancelled``, ``scheduled`` and
    failed attempts when there are some). Done counts every finished task: completed, dead or
    cancelled.

    Args:
        running: the tasks executing now (``Job.running_now``), when known: the rest of the
            leased ones are shown as prefetched (held by a worker, not started).
        retrying: the scheduled tasks are retries waiting out their backoff (no insert delay
            holds any back), and are called so.
    """
    of = "?" if total is None else f"{total:,}"
    line = f"{counts.finished:,}/{of} done · {counts.dead:,} dead · "
    if counts.cancelled:
        line += f"{counts.cancelled:,} cancelled · "
    now = running_shown(counts, running)
    line += f"{now:,} running · "
    line += f"{counts.leased - now:,} prefetched · " if counts.leased > now else ""
    line += f"{counts.queued:,} queued"
    if counts.scheduled:
        line += f" · {counts.scheduled:,} " + (
            "waiting to retry" if retrying and counts.failed else "scheduled"
        )
    # Failed attempts as they happen, retried or not: a task waiting out its retry backoff is
    # scheduled, and this says why.
    return line + (f" · {counts.failed:,} failed attempt(s)" if counts.failed else "")


def summary(counts: Counts, elapsed: float) -> str:
    """How a finished job ended, in one line."""
    line = f"finished in {_duration(elapsed)}: {counts.completed:,} completed, {counts.dead:,} dead"
    return line + (f", {counts.cancelled:,} cancelled" if counts.cancelled else "")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class InsertProgress:
    """Shows how many tasks an insert has queued: ``set(count)`` as it goes, ``close()`` at the end.
    This base class shows nothing (``progress=False`` or ``NBQUEUE_PROGRESS=off``)."""

    def set(self, count: int) -> None:
        pass

    def fail(self) -> None:
        """The insert failed: ``close()`` will draw that as the final state."""

    def close(self) -> None:
        pass


class _TextInsertProgress(InsertProgress):
    def __init__(self, total: int | None, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="task", file=sys.stderr, dynamic_ncols=True, leave=True)

    def set(self, count: int) -> None:
        self._bar.update(count - self._bar.n)

    def fail(self) -> None:
        self._bar.set_postfix_str("insert failed", refresh=False)

    def close(self) -> None:
        self._bar.close()


class _WidgetInsertProgress(InsertProgress):
    """The job's own widget, shown once the job exists and redrawn by the inserting thread."""

    def __init__(self, view: JobView) -> None:
        self._view = view
        self._failed = False

    def fail(self) -> None:
        self._failed = True

    def set(self, count: int) -> None:
        view = self._view
        if not view.shown:
            view.show()
        else:
            view.refresh()  # throttled by the view

    def close(self) -> None:
        view = self._view
        if view.shown:
            view.finish()
        if self._failed:
            view.stop()  # the final state is drawn; nothing more will happen to watch live


def insert_progress(view: JobView, total: int | None, enabled: bool = True) -> InsertProgress:
    """The right display for an insert: the job's widget in a notebook, a tqdm bar elsewhere."""
    mode = progress_mode() if enabled else "off"
    if mode == "widget":
        return _WidgetInsertProgress(view)
    if mode == "text":
        return _TextInsertProgress(total, f"insert {view.job.name}")
    return InsertProgress()


class JobBar:
    """A tqdm text bar of a job's finished tasks, driven by whoever polls the counters."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True) -> None:
        self._bar = None
        if enabled and progress_mode() == "text":
            from tqdm import tqdm

            # Off a terminal (papermill, logs) every redraw is a new line: redraw rarely there.
            interval = 0.25 if sys.stderr.isatty() else 2.0
            self._bar = tqdm(
                total=total, desc=desc, unit="task", file=sys.stderr, dynamic_ncols=True, mininterval=interval
            )

    def show(self, counts: Counts, total: int | None) -> None:
        if self._bar is None:
            return
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.set_postfix_str(
            f"dead={counts.dead} running={counts.leased} queued={counts.queued}"
            + (f" cancelled={counts.cancelled}" if counts.cancelled else "")
            + (f" scheduled={counts.scheduled}" if counts.scheduled else ""),
            refresh=False,
        )
        self._bar.update(counts.finished - self._bar.n)  # tqdm rate-limits the redraw

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- the job view --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskProgress:
    """How far a running task said it got (``current_task().progress``), as its worker's last
    heartbeat carried it."""

    task_id: str
    done: float
    total: float | None
    note: str
    worker: str
    reported: float  #: when the task reported it (the worker's clock)

    @property
    def fraction(self) -> float | None:
        """``done / total`` (0 to 1), or None when the total is unknown."""
        if not self.total:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)

    def text(self) -> str:
        """``task 7: 40% (40/100) fold 2``."""
        index = self.task_id.rsplit("-", 1)[-1]
        amount = f"{self.done:g}" if self.total is None else f"{self.done:g}/{self.total:g}"
        share = "" if self.fraction is None else f"{100 * self.fraction:.0f}% "
        return f"task {index}: {share}({amount})" + (f" {self.note}" if self.note else "")


#: Running tasks' own progress a view shows: the few furthest behind.
PROGRESS_SHOWN = 3


@dataclass
class Snapshot:
    """What the view shows at one moment."""

    counts: Counts
    total: int | None
    inserting: bool
    elapsed: float
    rate: float | None
    workers: int | None
    error: TaskError | None
    insert_error: str | None = None  #: why the insert stopped part-way, when it did
    #: Running tasks' own progress, furthest behind first (``TaskContext.progress``).
    running: list[TaskProgress] = field(default_factory=list)
    #: The job's tasks executing now, from the workers' heartbeats (None: not known).
    running_now: int | None = None
    #: Its scheduled tasks are retries waiting out their backoff (no insert delay holds any).
    retrying: bool = False

    @property
    def finished(self) -> bool:
        return not self.inserting and self.total is not None and self.counts.finished >= self.total

    def eta(self) -> float | None:
        if self.rate and self.total is not None:
            return max(self.total - self.counts.finished, 0) / self.rate
        return None

    def text(self, name: str) -> str:
        """The text view (also the widget's text/plain)."""
        c, total = self.counts, self.total
        width = 30
        if total:
            parts = [(c.completed, "█"), (c.dead, "✗"), (c.cancelled, "⊘"), (c.leased, "▒")]
            cells = "".join(ch * round(width * n / total) for n, ch in parts)[:width]
            bar = "|" + cells.ljust(width) + "|"
        else:
            bar = "|" + " " * width + "|"
        head = f"job {name} {bar} {describe(c, total, self.running_now, self.retrying)}"
        if self.inserting:
            head += f" · inserting ({c.inserted:,} queued so far)"
        if self.insert_error:
            head += f" · insert failed after {c.inserted:,} queued: {self.insert_error}"
        if self.finished:
            line = f"{head}\n{summary(c, self.elapsed)}"
        else:
            extras = [f"elapsed {_duration(self.elapsed)}"]
            if self.rate:
                extras.append(f"{self.rate:,.0f} tasks/s")
            eta = self.eta()
            if eta is not None and self.rate:
                extras.append(f"ETA {_duration(eta)}")
            line = head + " · " + " · ".join(extras)
        if self.workers is not None:
            line += f" · ran by {self.workers} worker(s)"
        if self.running and not self.finished:
            line += "".join(f"\n  {p.text()}" for p in self.running[:PROGRESS_SHOWN])
        if self.error is not None:
            line += f"\nlatest error: {self.error.task_id}: {self.error.type}: {self.error.message}"
        return line


class Watched(Protocol):
    """What a view needs of a job: its names, a snapshot, its results and its cancel (the
    buttons)."""

    id: str

    @property
    def name(self) -> str: ...

    def snapshot(self) -> Snapshot: ...

    def results(self, on_error: Literal["raise", "none", "exception"] = "raise") -> list[Any]: ...

    def cancel(self) -> int: ...


class JobView:
    """The live view of one job. ``text()`` anywhere; ``widget`` and ``show()`` in a notebook.

    It draws what the job computes (``Watched.snapshot``) and computes nothing itself."""

    def __init__(self, job: Watched) -> None:
        self.job = job
        self._widget: Any = None
        self._parts: dict[str, Any] = {}
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._refreshed = 0.0  # when the last refresh read the storage (monotonic)
        self.last: Snapshot | None = None

    # -- state -----------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A fresh snapshot of the job (what ``Job.snapshot`` computes)."""
        snap = self.job.snapshot()
        self.last = snap
        return snap

    def text(self) -> str:
        """The text view of the latest snapshot."""
        return (self.last or self.snapshot()).text(self.job.name)

    def refresh_text(self) -> str:
        """The text view of a fresh snapshot."""
        return self.snapshot().text(self.job.name)

    # -- widget ----------------------------------------------------------------------------------
    @property
    def widget(self) -> Any:
        """The ipywidgets view (built on first use)."""
        if self._widget is None:
            import ipywidgets as w

            p = self._parts
            p["title"] = w.HTML()
            p["bar"] = w.HTML()
            p["stats"] = w.HTML()
            p["running"] = w.HTML()
            p["trace"] = w.HTML()
            p["error"] = w.Accordion(children=[p["trace"]], selected_index=None)
            p["error"].layout.display = "none"
            p["summary"] = w.HTML()
            p["button"] = w.Button(
                description="Load results",
                icon="download",
                disabled=True,
                tooltip="job.results() into the variable job_results",
            )
            p["button"].on_click(self._load_results)
            p["done"] = w.HBox([p["summary"], p["button"]])
            p["done"].layout.display = "none"
            p["cancel"] = w.Button(
                description="Cancel", icon="stop", tooltip="job.cancel(): stop every task of this job"
            )
            p["cancel"].on_click(self._cancel)
            self._widget = _text_repr_vbox()(
                [p["title"], p["bar"], p["stats"], p["running"], p["error"], p["cancel"], p["done"]],
                view=self,
            )
            self._draw(self.last or self.snapshot())
        return self._widget

    def _draw(self, snap: Snapshot) -> None:
        p = self._parts
        if not p:
            return
        c, total = snap.counts, snap.total
        title = f"<b>job {html.escape(self.job.name)}</b>"
        if self.job.name != self.job.id:  # an unnamed job's name is its id: once is enough
            title += f" <code>{self.job.id}</code>"
        p["title"].value = title
        now = running_shown(c, snap.running_now)
        segments = [
            ("completed", c.completed),
            ("dead", c.dead),
            ("cancelled", c.cancelled),
            ("running", now),
            ("prefetched", c.leased - now),
            ("queued", c.queued),
            ("waiting to retry" if snap.retrying and c.failed else "scheduled", c.scheduled),
        ]
        denom = total or max(sum(n for _, n in segments), 1)
        blocks = "".join(
            f'<div title="{label}: {n:,}" style="width:{100 * n / denom:.3f}%;background:{COLORS[label]}">'
            "</div>"
            for label, n in segments
            if n
        )
        p["bar"].value = (
            '<div style="display:flex;height:14px;width:100%;max-width:640px;background:#eee;'
            f'border-radius:3px;overflow:hidden">{blocks}</div>'
        )
        stats = [describe(c, total, snap.running_now, snap.retrying), f"elapsed {_duration(snap.elapsed)}"]
        if snap.rate:
            stats.append(f"{snap.rate:,.0f} tasks/s")
        eta = snap.eta()
        if eta is not None and snap.rate and not snap.finished:
            stats.append(f"ETA {_duration(eta)}")
        if snap.workers is not None:
            stats.append(f"ran by {snap.workers} worker(s)")
        if snap.inserting:
            stats.append(f"inserting: {c.inserted:,} queued so far")
        if snap.insert_error:
            stats.append(f"insert failed after {c.inserted:,} queued: {snap.insert_error}")
        p["stats"].value = html.escape(" · ".join(stats))
        p["running"].value = "" if snap.finished else _progress_bars(snap.running[:PROGRESS_SHOWN])
        if snap.error is not None:
            e = snap.error
            p["error"].set_title(0, f"latest error: {e.task_id}: {e.type}: {e.message}"[:200])
            shown = html.escape(e.traceback or e.message)
            if e.output:
                shown += f"\n<b>its output</b> (task {e.task_id}):\n{html.escape(e.output)}"
            p["trace"].value = f"<pre style='font-size:11px'>{shown}</pre>"
            p["error"].layout.display = ""
        if snap.finished:
            p["summary"].value = html.escape(summary(c, snap.elapsed))
            p["button"].disabled = False
            p["done"].layout.display = ""
            p["cancel"].layout.display = "none"

    def _cancel(self, _button: Any = None) -> None:
        button = self._parts["cancel"]
        button.disabled = True
        ended = self.job.cancel()
        button.layout.width = "auto"
        button.description = f"Cancelled: {ended:,} waiting task(s) ended, running ones are told"
        self.refresh(force=True)
        self.start()  # the updater may have stopped: draw the running tasks as they end

    def _load_results(self, _button: Any = None) -> None:
        shell = _ipython()
        values = self.job.results(on_error="exception")
        if shell is not None:
            shell.user_ns["job_results"] = values
        self._parts["summary"].value += html.escape(f" · {len(values):,} results in job_results")

    # -- showing and updating --------------------------------------------------------------------
    @property
    def shown(self) -> bool:
        """True once ``show()`` displayed the view."""
        return self._handle is not None

    def show(self) -> None:
        """Display the view in the running cell (by display id) and start the live updates."""
        from IPython.display import display

        self._handle = display(self.widget, display_id=True)
        self.start()

    def refresh(self, force: bool = False) -> Snapshot:
        """Read the counters and redraw (safe from any thread: it only sets traits).

        At most every ``REFRESH_SECONDS`` unless ``force``: the updater thread and a waiting
        cell both call it, and a redraw nobody can see is a wasted read of the storage.
        """
        with self._lock:
            now = time.monotonic()
            if not force and self.last is not None and now - self._refreshed < REFRESH_SECONDS:
                return self.last
            self._refreshed = now
        snap = self.snapshot()
        self._draw(snap)
        return snap

    def finish(self) -> None:
        """From the waiting thread: draw the last state and re-send the display by its id, so a
        saved notebook keeps the final state (and its text) where the view was first shown."""
        self.refresh(force=True)
        if self._handle is not None:
            self._handle.update(self.widget)

    def start(self) -> None:
        """Start the background updater (once); it stops when the job ends or the widget closes."""
        if self._thread is None or not self._thread.is_alive():
            self._stopped.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"nbqueue-progress-{self.job.id}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the background updater (it also stops by itself when the job ends)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(REFRESH_SECONDS):
            if self._widget is not None and getattr(self._widget, "comm", True) is None:
                return  # the widget was closed
            try:
                snap = self.refresh()
            except Exception:  # a storage hiccup: the next tick tries again
                continue
            if snap.finished:
                return


def _progress_bars(running: list[TaskProgress]) -> str:
    """Small bars of running tasks' own progress, each with its note (an unknown total: no bar)."""
    rows = []
    for p in running:
        share = p.fraction
        bar = (
            '<div style="display:inline-block;width:120px;height:8px;background:#eee;'
            'border-radius:2px;overflow:hidden;margin-right:6px;vertical-align:middle">'
            f'<div style="width:{100 * share:.1f}%;height:100%;background:{COLORS["running"]}"></div></div>'
            if share is not None
            else ""
        )
        rows.append(f'<div style="font-size:11px;line-height:14px">{bar}{html.escape(p.text())}</div>')
    return "".join(rows)


@functools.cache
def _text_repr_vbox() -> type:
    """The widget class, built on first use so that ipywidgets is imported only in notebooks."""
    import ipywidgets as w

    class TextReprVBox(w.VBox):
        """A VBox whose text/plain is the job's text view (what a saved notebook shows)."""

        def __init__(self, children: list, view: JobView) -> None:
            super().__init__(children)
            self._view = view

        def _repr_mimebundle_(self, **kwargs: Any) -> dict:
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            bundle["text/plain"] = self._view.text()
            return bundle

        def __repr__(self) -> str:
            return self._view.text()

    return TextReprVBox
