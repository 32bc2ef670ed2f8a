"""The layered house: imports point down only (function-local and TYPE_CHECKING imports count),
and no module reaches into another module's private names. The contract is in pyproject.toml
and ../shared/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Underscore names that are public protocols of other libraries, not anyone's private state.
PUBLIC_UNDERSCORE = {"_replace", "_repr_mimebundle_", "_ipython_display_", "_repr_pretty_"}


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which(
        "lint-imports"
    )
    assert command, "lint-imports is missing: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [command, "--no-logo", "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_imports_point_down_only():
    done = lint_imports(ROOT, ROOT)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout + done.stderr


def test_the_contract_catches_a_function_local_import_that_points_up(tmp_path):
    """The check can fail: a copy of the package whose lowest module reaches up, inside a
    function (the kind of import that used to hide the cycle), breaks the contract."""
    shutil.copytree(ROOT / "nbqueue", tmp_path / "nbqueue", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "nbqueue" / "ids.py", "a") as f:
        f.write("\n\ndef _reach_up():\n    from .queue import TaskQueue\n\n    return TaskQueue\n")
    done = lint_imports(tmp_path, tmp_path)
    assert done.returncode != 0, done.stdout
    assert "nbqueue.ids is not allowed to import nbqueue.queue" in done.stdout, done.stdout


def test_no_module_reads_another_modules_private_names():
    """R4: ``other._name`` only on ``self``/``cls``; no ``from .x import _name``."""
    found = []
    for path in sorted((ROOT / "nbqueue").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    if node.attr not in PUBLIC_UNDERSCORE:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.level:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name}")
    assert found == [], "\n".join(found)


def test_the_readme_layout_table_is_the_contract():
    """README's layout table lists the contract's layers, top to bottom, module for module."""
    import re

    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0][
        "layers"
    ]
    contract = [sorted(m.strip().removeprefix("nbqueue.") for m in re.split("[:|]", row)) for row in layers]
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| layer | modules |") :].split("\n\n", 1)[0].splitlines()[2:]
    listed = [sorted(re.findall(r"`(\w+)`", row.split("|")[2])) for row in table]
    assert listed == contract
