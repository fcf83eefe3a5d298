"""IMPORTS, the layering linter, run as .lintrunner.toml runs it."""

from __future__ import annotations

from pathlib import Path

from tools.tests.lintrunner_config import FIXTURES, run_linter

BAD = FIXTURES / "imports" / "bad"
GOOD = FIXTURES / "imports" / "good"


def test_each_forbidden_import_is_named_with_what_is_allowed(tmp_path: Path) -> None:
    files = sorted(BAD.rglob("*.py"))
    messages = run_linter("IMPORTS", files, tmp_path)
    found = {(Path(m["path"]).name, m["line"]) for m in messages}
    assert found == {("attention.py", 1), ("engine.py", 1), ("engine.py", 2), ("test_client.py", 1)}
    by_file = {(Path(m["path"]).name, m["line"]): m["description"] for m in messages}
    assert "imports kvstack.store.client" in by_file[("attention.py", 1)]
    assert (
        "kvstack.kernels may import only no other kvstack package" in by_file[("attention.py", 1)]
    )
    # `from ..kernels import x` inside kvstack/transfer resolves to kvstack.kernels.
    assert "imports kvstack.kernels.paged_attention" in by_file[("engine.py", 2)]
    assert "kvstack.store may import only kvstack.transfer" in by_file[("test_client.py", 1)]
    assert all(m["code"] == "IMPORTS" and m["severity"] == "error" for m in messages)


def test_allowed_imports_pass(tmp_path: Path) -> None:
    assert run_linter("IMPORTS", sorted(GOOD.rglob("*.py")), tmp_path) == []


def test_unparsable_file_is_reported_not_skipped(tmp_path: Path) -> None:
    broken = tmp_path / "packages" / "store" / "src" / "kvstack" / "store" / "broken.py"
    broken.parent.mkdir(parents=True)
    broken.write_text("def f(:\n")
    messages = run_linter("IMPORTS", [broken], tmp_path)
    assert [m["name"] for m in messages] == ["unreadable-file"]
