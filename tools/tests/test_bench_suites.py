"""Every suite of `nox -s bench` writes a valid kvstack-bench/1 document (smoke sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from noxfile import BENCH_SUITES
from tools.bench.schema import load
from tools.tests.lintrunner_config import ROOT


def test_every_package_with_a_bench_command_is_a_suite() -> None:
    with_bench = {
        path.parent.name
        for path in (ROOT / "packages").glob("*/src/kvstack/*/cli.py")
        if "bench" in path.read_text()
    }
    assert with_bench <= set(BENCH_SUITES)


@pytest.mark.parametrize("suite", sorted(BENCH_SUITES))
def test_quick_bench_writes_a_valid_document(suite: str, tmp_path: Path) -> None:
    script = BENCH_SUITES[suite].script
    command = [script] if script else ["-m", f"kvstack.{suite}", "bench"]
    out = tmp_path / f"{suite}.json"
    proc = subprocess.run(
        [sys.executable, *command, "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = load(out)  # raises SchemaError naming every problem
    assert document["suite"] == suite
    assert document["results"]
