"""The `tooling` benchmark: wall time of `pyrefly check` vs a cold `mypy` over the whole monorepo.

Both check the same files (the ones pyrefly.toml covers) with the same interpreter's
site-packages, interleaved, several runs each; the result is the median with the ratio
mypy / pyrefly (higher is better for us). mypy runs cold (a fresh cache directory every run),
since Pyrefly keeps no cache between CLI runs either.

    python -m tools.bench.bench_tooling [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.schema import make_document
from tools.parity import BIN, ROOT, covered_files


def pyrefly_argv() -> list[str]:
    return [str(BIN / "pyrefly"), "check", "--summary=none", "--output-format", "min-text"]


def mypy_argv(files: Sequence[Path], cache_dir: Path) -> list[str]:
    return [
        str(BIN / "python"),
        "-m",
        "mypy",
        "--python-executable",
        sys.executable,
        "--python-version",
        "3.11",
        "--platform",
        "linux",
        "--namespace-packages",
        "--explicit-package-bases",
        "--ignore-missing-imports",
        "--cache-dir",
        str(cache_dir),
        "--no-error-summary",
        *map(str, files),
    ]


def timed(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Seconds one run takes; its findings don't matter here (the checkers differ), a crash does."""
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return took


def run(runs: int) -> dict[str, Any]:
    files = covered_files(ROOT, pyrefly=BIN / "pyrefly")
    lines = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    # mypy resolves `kvstack.*` and `tools.*` through MYPYPATH, as Pyrefly does through search-path.
    mypy_path = ":".join([*(str(p) for p in sorted((ROOT / "packages").glob("*/src"))), str(ROOT)])
    env = {**os.environ, "MYPYPATH": mypy_path}
    pyrefly_s: list[float] = []
    mypy_s: list[float] = []
    timed(pyrefly_argv())  # warm-up: page cache and binary load, for both tools
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="kvstack-mypy-cache-") as cache:
            if i == 0:
                timed(mypy_argv(files, Path(cache)), env)
            pyrefly_s.append(timed(pyrefly_argv()))
        with tempfile.TemporaryDirectory(prefix="kvstack-mypy-cache-") as cache:
            mypy_s.append(timed(mypy_argv(files, Path(cache)), env))
        print(
            f"tooling: run {i + 1}/{runs}: pyrefly {pyrefly_s[-1]:.2f} s, mypy {mypy_s[-1]:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    ours, baseline = statistics.median(pyrefly_s), statistics.median(mypy_s)
    result = {
        "name": "type check whole monorepo",
        "metric": "wall_time_median",
        "unit": "s",
        "value": ours,
        "baseline": {"name": "mypy (cold cache)", "value": baseline},
        "ratio": baseline / ours,
        "higher_is_better": False,
        "target": None,
        "limit": None,
        "params": {
            "files": len(files),
            "lines": lines,
            "runs": runs,
            "pyrefly_runs_s": pyrefly_s,
            "mypy_runs_s": mypy_s,
        },
    }
    versions = {name: importlib.metadata.version(name) for name in ("pyrefly", "mypy")}
    return make_document("tooling", [result], versions=versions, root=ROOT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each checker")
    parser.add_argument("--json", type=Path, help="write the kvstack-bench/1 document here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    document = run(args.runs)
    result = document["results"][0]
    print(
        f"pyrefly {result['value']:.2f} s vs mypy {result['baseline']['value']:.2f} s "
        f"(median of {args.runs}, {result['params']['files']} files, "
        f"{result['params']['lines']} lines): pyrefly is {result['ratio']:.1f}x faster"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
