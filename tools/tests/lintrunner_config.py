"""Run one linter exactly as .lintrunner.toml defines it, on files the test chooses."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def linter_command(code: str) -> list[str]:
    config = tomllib.loads((ROOT / ".lintrunner.toml").read_text())
    for linter in config["linter"]:
        if linter["code"] == code:
            return list(linter["command"])
    raise KeyError(f"no linter with code {code!r} in .lintrunner.toml")


def run_linter(code: str, files: Sequence[Path], tmp_path: Path) -> list[dict[str, Any]]:
    """The LintMessages the configured linter prints for `files`, given as lintrunner does."""
    paths_file = tmp_path / f"{code}-paths.txt"
    paths_file.write_text("".join(f"{f.resolve()}\n" for f in files))
    argv = [arg.replace("{{PATHSFILE}}", str(paths_file)) for arg in linter_command(code)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    # lintrunner adapters must exit 0 and report problems as messages.
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
