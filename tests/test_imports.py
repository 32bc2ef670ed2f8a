"""`import nbqueue` stays light: a worker must start without Jupyter, widgets, redis or gevent."""

from __future__ import annotations

from .helpers import run_python


def test_import_nbqueue_pulls_in_no_optional_dependency():
    done = run_python(
        """
import sys
import nbqueue
heavy = ("redis", "ipywidgets", "IPython", "jupyter_server", "gevent", "dill", "numpy", "tqdm")
print(",".join(sorted(m for m in heavy if m in sys.modules)))
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
