"""Progress displays. The text view (tqdm) works everywhere: terminals, papermill, nbclient.

``NBQUEUE_PROGRESS=off`` silences every bar; ``text`` is the default.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .backends.base import Counts

ENV_PROGRESS = "NBQUEUE_PROGRESS"


def progress_mode() -> str:
    """``text`` or ``off`` (read once per display)."""
    mode = os.environ.get(ENV_PROGRESS, "text").strip().lower()
    return mode if mode in ("text", "off", "widget") else "text"


class _NullBar:
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def insert_bar(total: int | None, desc: str, enabled: bool = True) -> Any:
    """A bar counting uploaded tasks (a no-op when disabled)."""
    if not enabled or progress_mode() == "off":
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", file=sys.stderr, dynamic_ncols=True, leave=True)


def describe(counts: Counts, total: int | None) -> str:
    """One line: ``done/total, failed, running, queued``."""
    of = "?" if total is None else str(total)
    return (
        f"{counts.completed + counts.dead}/{of} done · {counts.dead} failed · "
        f"{counts.leased} running · {counts.queued} queued"
    )


class JobBar:
    """A text bar of a job's finished tasks, driven by whoever polls the counters."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True) -> None:
        self._bar = None
        if enabled and progress_mode() != "off":
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
            f"failed={counts.dead} running={counts.leased} queued={counts.queued}", refresh=False
        )
        self._bar.update(counts.finished - self._bar.n)  # tqdm rate-limits the redraw

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
