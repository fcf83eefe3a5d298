"""tools/parity.py: each check passes on the workspace and fails on a planted fault."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tools import parity
from tools.tests.lintrunner_config import FIXTURES, ROOT

PYREFLY = parity.BIN / "pyrefly"


def mini_project(tmp_path: Path, fixture: str = "bad.py") -> Path:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    shutil.copy(FIXTURES / "pyrefly" / fixture, project / "src" / "module.py")
    (project / "pyrefly.toml").write_text(
        'project-includes = ["src"]\n'
        'python-version = "3.11"\n'
        f'python-interpreter-path = "{sys.executable}"\n'
    )
    return project


# 1. pins


def test_installed_tools_match_the_lock() -> None:
    assert parity.check_pins(ROOT / "requirements.txt") == []


def test_a_wrong_pin_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    text = (ROOT / "requirements.txt").read_text()
    pinned = parity.read_lock(ROOT / "requirements.txt")["ruff"]
    lock.write_text(text.replace(f"ruff=={pinned}", "ruff==0.0.1"))
    problems = parity.check_pins(lock)
    assert any(p.startswith(f"ruff: {parity.BIN / 'ruff'} is {pinned}") for p in problems)
    assert any("pins 0.0.1" in p for p in problems)


def test_an_unpinned_tool_is_reported(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    lock.write_text("\n".join(line for line in lines if not line.startswith("lintrunner==")))
    assert f"lintrunner is not pinned in {lock}" in parity.check_pins(lock)


# 2. config resolution


def test_every_package_resolves_to_the_root_config() -> None:
    assert parity.check_config(ROOT) == []


def test_a_nested_tool_pyrefly_table_is_caught(tmp_path: Path) -> None:
    project = mini_project(tmp_path, "good.py")
    sample = "src/module.py"
    assert parity.check_config(project, [sample]) == []
    (project / "src" / "pyproject.toml").write_text('[tool.pyrefly]\nproject-includes = ["."]\n')
    problems = parity.check_config(project, [sample])
    assert f"{sample} is checked with {project / 'src' / 'pyproject.toml'}" in problems[0]
    assert "src/pyproject.toml has a [tool.pyrefly] table" in problems


# 3. editor (pyrefly lsp) = CLI


def test_planted_type_error_is_reported_by_both(tmp_path: Path) -> None:
    project = mini_project(tmp_path)
    problems, agreed = parity.check_lsp(project, pyrefly=PYREFLY)
    assert problems == []
    assert agreed >= 1
    files = parity.covered_files(project, pyrefly=PYREFLY)
    lsp, _ = parity.lsp_diagnostics(project, files, pyrefly=PYREFLY)
    planted = parity.Diagnostic(
        str((project / "src" / "module.py").resolve()), 5, 14, "bad-assignment", "error"
    )
    assert planted in lsp


def test_a_difference_between_editor_and_cli_is_listed(tmp_path: Path) -> None:
    project = mini_project(tmp_path)
    cli, _ = parity.cli_diagnostics(project, pyrefly=PYREFLY)
    # The editor sees another text than the CLI did: the planted error moved two lines down.
    module = project / "src" / "module.py"
    module.write_text("\n\n" + module.read_text())
    files = parity.covered_files(project, pyrefly=PYREFLY)
    lsp, _ = parity.lsp_diagnostics(project, files, pyrefly=PYREFLY)
    problems = parity.diff(cli, lsp)
    assert any(p.startswith("only in `pyrefly check`:") and ":5:14" in p for p in problems)
    assert any(p.startswith("only in the editor (pyrefly lsp):") and ":7:14" in p for p in problems)


def test_main_passes_on_the_workspace() -> None:
    assert parity.main(["--only", "pins", "--only", "config"]) == 0
