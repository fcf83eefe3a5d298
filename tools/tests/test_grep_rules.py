"""The grep rules of .lintrunner.toml (BAREIGNORE, NOQA, NOTOOLPYREFLY) on bad and good fixtures."""

from __future__ import annotations

from pathlib import Path

from tools.tests.lintrunner_config import FIXTURES, run_linter

GREP = FIXTURES / "grep"


def test_bare_ignores_are_reported_line_by_line(tmp_path: Path) -> None:
    messages = run_linter("BAREIGNORE", [GREP / "bad_ignores.py"], tmp_path)
    assert sorted(m["line"] for m in messages) == [1, 2, 3, 4]
    assert {m["code"] for m in messages} == {"BAREIGNORE"}
    assert all(m["severity"] == "error" for m in messages)


def test_ignores_with_codes_pass(tmp_path: Path) -> None:
    assert run_linter("BAREIGNORE", [GREP / "good_ignores.py"], tmp_path) == []


def test_bare_noqa_is_reported(tmp_path: Path) -> None:
    messages = run_linter("NOQA", [GREP / "bad_ignores.py"], tmp_path)
    assert sorted(m["line"] for m in messages) == [5, 6]


def test_noqa_with_a_code_passes(tmp_path: Path) -> None:
    assert run_linter("NOQA", [GREP / "good_ignores.py"], tmp_path) == []


def test_nested_pyrefly_config_is_refused(tmp_path: Path) -> None:
    messages = run_linter("NOTOOLPYREFLY", [GREP / "nested_bad" / "pyproject.toml"], tmp_path)
    assert [m["line"] for m in messages] == [4]
    assert "pyrefly.toml" in messages[0]["description"]


def test_pyproject_without_pyrefly_table_passes(tmp_path: Path) -> None:
    good = GREP / "nested_good" / "pyproject.toml"
    assert run_linter("NOTOOLPYREFLY", [good], tmp_path) == []
