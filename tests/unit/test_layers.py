"""The import contract of pyproject.toml ([tool.importlinter]) holds, and would catch a break of the layers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("planted", "broken"),
    [
        # an upward import: the foundation importing the pipeline
        ({"foundation/keys.py": "consumers.applier"}, "foundation.keys -> consumers.applier"),
        # an import between two pipeline packages, which meet only on Kafka topics
        ({"link/requests.py": "cdc.placement"}, "link.requests -> cdc.placement"),
        # a cycle between two modules of one package
        (
            {"foundation/sql.py": "foundation.keys", "foundation/keys.py": "foundation.sql"},
            "No import cycles among the modules of a package BROKEN",
        ),
    ],
    ids=["upward", "between pipeline packages", "cycle"],
)
def test_a_broken_layer_rule_breaks_the_contract(tmp_path: Path, planted: dict[str, str], broken: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    for path, module in planted.items():
        source = tree / path
        source.write_text(source.read_text() + f"\nimport {module}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert broken in result.stdout
