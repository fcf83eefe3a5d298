"""PYREFLY, the local lintrunner adapter: findings, and failures that must never look clean."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools.tests.lintrunner_config import FIXTURES, linter_command, run_linter

PYREFLY_FIXTURES = FIXTURES / "pyrefly"


def make_project(tmp_path: Path, fixture: str, *, extra_config: str = "") -> Path:
    """A one-file Pyrefly project using this interpreter, like the workspace's own config."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PYREFLY_FIXTURES / fixture, project / fixture)
    (project / "pyrefly.toml").write_text(
        'project-includes = ["*.py"]\n'
        'python-version = "3.11"\n'
        f'python-interpreter-path = "{sys.executable}"\n' + extra_config
    )
    return project


def run_on(project: Path, files: list[Path], tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    """Run the configured PYREFLY command on `project`'s config, plus `extra` flags."""
    paths_file = tmp_path / "paths.txt"
    paths_file.write_text("".join(f"{f}\n" for f in files))
    argv = []
    for arg in linter_command("PYREFLY"):
        if arg.startswith("--config="):
            argv += [f"--config={project / 'pyrefly.toml'}", *extra]
        else:
            argv.append(arg.replace("{{PATHSFILE}}", str(paths_file)))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_type_error_becomes_an_error_message(tmp_path: Path) -> None:
    project = make_project(tmp_path, "bad.py")
    messages = run_on(project, [project / "bad.py"], tmp_path)
    assert len(messages) == 1
    (message,) = messages
    assert message["code"] == "PYREFLY"
    assert message["name"] == "bad-assignment"
    assert message["severity"] == "error"
    assert message["path"] == str((project / "bad.py").resolve())
    assert (message["line"], message["char"]) == (5, 14)


def test_clean_file_gives_no_messages(tmp_path: Path) -> None:
    project = make_project(tmp_path, "good.py")
    assert run_on(project, [project / "good.py"], tmp_path) == []


def test_messages_are_limited_to_the_files_lintrunner_asked_about(tmp_path: Path) -> None:
    project = make_project(tmp_path, "bad.py")
    shutil.copy(PYREFLY_FIXTURES / "good.py", project / "good.py")
    assert run_on(project, [project / "good.py"], tmp_path) == []


def test_unknown_config_key_fails_instead_of_being_ignored(tmp_path: Path) -> None:
    project = make_project(tmp_path, "good.py", extra_config="use-untyped-imports = true\n")
    messages = run_on(project, [project / "good.py"], tmp_path)
    assert [(m["path"], m["name"]) for m in messages] == [(None, "config-problem")]
    assert "Extra keys found" in str(messages[0]["description"])


def test_unqueryable_interpreter_fails(tmp_path: Path) -> None:
    project = make_project(tmp_path, "good.py")
    config = project / "pyrefly.toml"
    config.write_text(config.read_text().replace(sys.executable, "/nonexistent/python"))
    messages = run_on(project, [project / "good.py"], tmp_path)
    assert [(m["path"], m["name"]) for m in messages] == [(None, "config-problem")]


def fake_pyrefly(tmp_path: Path, script: str) -> Path:
    path = tmp_path / "fake-pyrefly"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(
    ("script", "name"),
    [
        ("echo 'thread main panicked' >&2; exit 101\n", "command-failed"),
        ("echo 'not json at all'; exit 0\n", "json-parse-error"),
        ("exit 1\n", "json-parse-error"),
        (
            'echo \'{"errors": []}\'; echo "Fatal configuration error" >&2; exit 1\n',
            "config-problem",
        ),
        ("echo '{\"errors\": []}'; exit 1\n", "command-failed"),
    ],
    ids=["crash", "garbage", "silent-failure", "fatal-config", "exit-1-without-errors"],
)
def test_a_broken_checker_is_a_general_failure_never_a_clean_run(
    tmp_path: Path, script: str, name: str
) -> None:
    project = make_project(tmp_path, "good.py")
    pyrefly = fake_pyrefly(tmp_path, script)
    messages = run_on(project, [project / "good.py"], tmp_path, f"--pyrefly={pyrefly}")
    assert [(m["path"], m["name"], m["severity"]) for m in messages] == [(None, name, "error")]


def test_missing_binary_is_a_general_failure(tmp_path: Path) -> None:
    project = make_project(tmp_path, "good.py")
    messages = run_on(project, [project / "good.py"], tmp_path, "--pyrefly=/nonexistent/pyrefly")
    assert [(m["path"], m["name"]) for m in messages] == [(None, "command-failed")]


def test_the_workspace_itself_is_clean(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "tools").glob("*.py"))
    assert run_linter("PYREFLY", files, tmp_path) == []
