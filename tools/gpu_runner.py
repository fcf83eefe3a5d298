"""Run kvstack's GPU sessions on a runner that has CUDA torch and triton but no network.

Such a runner's Python lacks nox, pytest and a few pure-Python packages our packages import.
They travel as wheels, pinned by the lock; torch, triton and numpy are never carried, so the
runner's CUDA builds are never replaced.

Where pip can reach an index (with the project venv built):
    .venv/bin/python -m tools.gpu_runner download            # -> .whl/ (for CPython 3.12)
Carry the repository with .whl/ to the runner, then there:
    python3 tools/gpu_runner.py install                      # missing ones only -> .gpu-site/
    python3 tools/gpu_runner.py nox -s gpu_tests             # nox with .gpu-site importable
    python3 tools/gpu_runner.py nox -s bench
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
SITE = ROOT / ".gpu-site"
LOCK = ROOT / "requirements.txt"
# What the GPU sessions need beyond the packages' own dependencies: the task runner, the test
# runner, the plots, and the tests' own imports (the official OpenAI client calls the server).
SESSION_TOOLS = ("nox", "pytest", "pytest-timeout", "matplotlib", "openai")
# The runner's CUDA builds: never carried, never installed over.
RUNNER_PROVIDED = frozenset({"torch", "triton", "numpy"})
# manylinux tags pip must accept for the runner (x86-64, glibc 2.17 and newer).
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def log(message: str) -> None:
    print(f"gpu_runner: {message}", file=sys.stderr, flush=True)


def package_dependencies() -> set[str]:
    """Third-party distributions the kvstack packages declare (first-party ones dropped)."""
    names = set()
    for pyproject in sorted((ROOT / "packages").glob("*/pyproject.toml")):
        for requirement in tomllib.loads(pyproject.read_text())["project"].get("dependencies", []):
            name = normalize(re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0])
            if not name.startswith("kvstack-"):
                names.add(name)
    return names


def closure(roots: Iterable[str], python_version: str) -> set[str]:
    """The roots and everything they require on CPython `python_version`, from the installed
    metadata of this environment, without descending into RUNNER_PROVIDED (the runner brings
    those and their needs)."""
    # Only `download` needs packaging, and it runs in the project venv; `install` and `nox` run
    # on the bare runner with the stdlib alone.
    from packaging.requirements import Requirement  # noqa: PLC0415 -- see above

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    seen: set[str] = set()
    todo = [normalize(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in RUNNER_PROVIDED:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError as exc:
            raise SystemExit(
                f"gpu_runner: {name} is not installed here; run this with the project venv "
                "(.venv/bin/python -m tools.gpu_runner download)"
            ) from exc
        for text in requires:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or marker.evaluate({**environment, "extra": ""}):
                todo.append(normalize(requirement.name))
    return seen


def read_lock() -> dict[str, str]:
    pins = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version
    return pins


def download(dest: Path, python_version: str) -> int:
    pins = read_lock()
    names = sorted(closure([*SESSION_TOOLS, *package_dependencies()], python_version))
    unpinned = [n for n in names if n not in pins]
    if unpinned:
        log(f"not in {LOCK.name}: {unpinned}; add them to requirements.in and re-lock")
        return 1
    dest.mkdir(exist_ok=True)
    specs = [f"{name}=={pins[name]}" for name in names]
    log(f"downloading {len(specs)} wheels for CPython {python_version} into {dest}")
    argv = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--implementation", "cp", "--python-version", python_version,
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        "--dest", str(dest), *specs,
    ]  # fmt: skip
    return subprocess.run(argv, check=False).returncode


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-", 1)[0])


def install(wheels: Path, target: Path) -> int:
    """Install into `target` the carried wheels whose distribution this Python lacks."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        log(f"no wheels in {wheels}: run `download` where pip can reach an index, then carry it")
        return 1
    missing = []
    for wheel in found:
        name = wheel_name(wheel)
        if name in RUNNER_PROVIDED:
            log(f"refusing to install {wheel.name}: the runner's own {name} must stay")
            return 1
        try:
            log(f"keeping the runner's {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    if not missing:
        log("nothing to install")
        return 0
    log(f"installing {', '.join(w.name for w in missing)} into {target}")
    argv = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
        "--no-compile", "--upgrade", "--target", str(target), *map(str, missing),
    ]  # fmt: skip
    return subprocess.run(argv, check=False).returncode


def run_nox(nox_args: Sequence[str], target: Path) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "nox", *nox_args]
    log(" ".join(argv))
    return subprocess.run(argv, cwd=ROOT, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_download = sub.add_parser("download", help="fetch the wheels a GPU runner lacks")
    p_download.add_argument("--dest", type=Path, default=WHEELS, help="wheel folder to fill")
    p_download.add_argument(
        "--python-version", default="3.12", help="the runner's CPython version (default 3.12)"
    )
    p_install = sub.add_parser("install", help="install the carried wheels this Python lacks")
    p_install.add_argument("--wheels", type=Path, default=WHEELS, help="carried wheel folder")
    p_install.add_argument("--target", type=Path, default=SITE, help="where to install them")
    sub.add_parser(
        "nox", help="run nox (all further arguments are nox's) with .gpu-site importable"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["nox"]:
        # Everything after `nox` belongs to nox, options included.
        return run_nox(argv[1:], SITE)
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.dest, args.python_version)
    return install(args.wheels, args.target)


if __name__ == "__main__":
    raise SystemExit(main())
