"""The peer's task function. python-task-queue ships functions by reference, so it must live in
an importable module (nbqueue's equivalent is defined notebook-style in run.py)."""

from taskqueue import queueable


@queueable
def noop(i):
    return i
