"""The import contract of pyproject.toml ([tool.importlinter]) holds, and would catch a break of the layers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ["schemas", "foundation", "cdc", "consumers", "link", "djlink", "devtools"]


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
            "--config",
            str(tree / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_the_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layers_of_the_tree_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    tree = copy_of_the_tree(tmp_path)
    keys = tree / "foundation" / "keys.py"
    keys.write_text(keys.read_text() + "\nimport consumers.applier  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "foundation.keys -> consumers.applier" in result.stdout


def test_an_import_between_pipeline_packages_breaks_the_contract(tmp_path: Path) -> None:
    tree = copy_of_the_tree(tmp_path)
    requests = tree / "link" / "requests.py"
    requests.write_text(requests.read_text() + "\nimport cdc.placement  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "link.requests -> cdc.placement" in result.stdout


def test_a_cycle_between_modules_of_a_package_breaks_the_contract(tmp_path: Path) -> None:
    tree = copy_of_the_tree(tmp_path)
    sql = tree / "foundation" / "sql.py"
    sql.write_text(sql.read_text() + "\nimport foundation.keys  # noqa\n")
    keys = tree / "foundation" / "keys.py"
    keys.write_text(keys.read_text() + "\nimport foundation.sql  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "No import cycles among the modules of a package BROKEN" in result.stdout
