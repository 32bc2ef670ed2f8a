"""The demo notebooks, executed top to bottom by a real kernel (nbclient, and papermill)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.slow


def outputs(nb) -> list[str]:
    """Every text a reader of the saved notebook sees, cell by cell."""
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type == "error":
                texts.append(f"ERROR {out.ename}: {out.evalue}")
            elif "data" in out:
                texts.append(out.data.get("text/plain", ""))
    return texts


def run_notebook(name: str, workdir: Path):
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", workdir)
    nb = nbformat.read(workdir / f"{name}.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return nb


def test_quickstart_notebook(tmp_path):
    nb = run_notebook("quickstart", tmp_path)
    texts = outputs(nb)
    insert_output = texts[0]  # the insert cell's view, brought to its final state by wait()
    assert "200/200 done · 1 dead · 0 running · 0 queued" in insert_output
    assert "latest error" in insert_output and "ValueError: 13 is unlucky" in insert_output
    assert any("200 results, 1 dead" in t for t in texts)
    assert any("ValueError: 13 is unlucky (after 3 attempt(s))" in t for t in texts)
    assert any("it printed: scoring 13" in t for t in texts)  # the task's output, kept with it
    # The burst workers that ran it, counted after they exited (one may have run every task).
    assert re.search(r"ran by [12] worker\(s\)", insert_output), insert_output
    assert not any(t.startswith("ERROR") for t in texts)


def test_cell_magic_notebook(tmp_path):
    nb = run_notebook("cell_magic", tmp_path)
    texts = outputs(nb)
    assert any("15/15 done · 0 dead" in t for t in texts)
    table = next(t for t in texts if t.startswith("mean mse by alpha"))
    assert len(table.strip().splitlines()) == 7  # title, the column's name, five alphas
    best = next(t for t in texts if t.startswith("alpha ") and "seed" in t and "mse" in t)
    assert "duration" in best  # the best row of the job's table
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
        for c in nb.cells
        for o in c.get("outputs", [])
    )  # the plot
    # A helper calling from-imported scikit-learn ships by value, the library by reference.
    explained = next(t for t in texts if t.startswith("fit_eval: "))
    by_value, by_reference = explained.split("; by reference: ")
    assert "by value: __main__.fit_eval" in by_value and "nbqueue" not in by_reference
    assert "Xc (12.7 KB)" in by_value and "yc (1.7 KB)" in by_value  # the data it reads, with sizes
    assert "sklearn.model_selection._validation.cross_val_score" in by_reference
    assert any("6/6 done · 0 dead" in t for t in texts)
    best = next(t for t in texts if t.startswith("best SVC accuracy:"))
    assert 0.5 < float(best.split()[-1]) <= 1.0
    assert not any(t.startswith("ERROR") for t in texts)


def test_papermill_pipeline(tmp_path):
    import papermill

    shutil.copy(NOTEBOOKS / "papermill_pipeline.ipynb", tmp_path)
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        str(tmp_path / "papermill_pipeline.ipynb"),
        str(out),
        parameters={"n_tasks": 200},
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    texts = outputs(nbformat.read(out, as_version=4))
    assert any("job nightly" in t and "200/200 done · 0 dead" in t for t in texts)  # the final state, saved
    assert any("200 walks" in t for t in texts)


def test_notebooks_are_saved_clean_with_the_python3_kernel():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.kernelspec.name == "python3", path
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path
    pipeline = nbformat.read(NOTEBOOKS / "papermill_pipeline.ipynb", as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in pipeline.cells)


def run_code(client, code: str, timeout: float = 120) -> str:
    """Execute ``code`` on a kernel and return what it printed (raising on an error)."""
    msg_id = client.execute(code)
    printed = []
    while True:
        msg = client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            printed.append(content["text"])
        elif kind == "error":
            raise AssertionError(f"{content['ename']}: {content['evalue']}")
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(printed)


def test_job_survives_a_kernel_restart_and_reattaches(tmp_path):
    from jupyter_client.manager import start_new_kernel

    url = f"fq://{tmp_path / 'q'}"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        job_id = run_code(
            kc,
            f"""
import time
from functools import partial
from nbqueue import TaskQueue, queueable

@queueable
def slow(i):
    time.sleep(0.2)
    return i

tq = TaskQueue("{url}")
job = tq.insert((partial(slow, i) for i in range(20)), progress=False)
workers = tq.spawn_workers(2, burst=True)
print(job.id)
""",
        ).strip()
        kc.stop_channels()
        km.restart_kernel(now=True)  # mid-job: the workers are not the kernel's children
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        listing = run_code(kc, f"%load_ext nbqueue\n%queue jobs {url}")
        assert f"job {job_id}" in listing and "/20 done" in listing  # listed after the restart
        out = run_code(
            kc,
            f"""
from nbqueue import TaskQueue
job = TaskQueue("{url}").job("{job_id}")
job.wait(timeout=60, progress=False)
print(sum(job.results()), job.counts().completed)
""",
        )
        assert out.split() == [str(sum(range(20))), "20"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
