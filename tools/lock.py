"""Resolve requirements.in into requirements.txt, the workspace's one lock of exact versions.

Run it with the interpreter CI uses (Python 3.11): it installs requirements.in into a throwaway
venv and writes what pip resolved, every transitive dependency included, with `==` pins.
Like pip-compile, it keeps the versions already in requirements.txt (they are passed to pip as
constraints) unless `--upgrade NAME` frees one; `--upgrade-all` re-resolves everything.
Nothing else in the repository names a version.

A requirement marked `# no-deps` in requirements.in (a data-only wheel whose declared
dependencies we never import) is resolved and installed without its dependencies; the lock keeps
the marker so tools/bootstrap.py installs it the same way.

    python3 tools/lock.py [--upgrade NAME ...] [--upgrade-all]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS_IN = ROOT / "requirements.in"
REQUIREMENTS_TXT = ROOT / "requirements.txt"
NO_DEPS_MARKER = "# no-deps"

HEADER = """\
# The workspace's lock: every version used anywhere in kvstack, written by `python3 tools/lock.py`
# from requirements.in (Python {python}). Do not edit by hand: change requirements.in and re-run.
"""


def current_pins(freed: set[str]) -> list[str]:
    """The `name==version` lines of requirements.txt, minus the names in `freed`."""
    if not REQUIREMENTS_TXT.exists():
        return []
    pins = []
    for raw in REQUIREMENTS_TXT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and normalize(line.split("==")[0]) not in freed:
            pins.append(line)
    return pins


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def split_no_deps(lines: list[str]) -> tuple[list[str], list[str]]:
    """(requirements resolved with their dependencies, those marked `# no-deps`)."""
    normal, no_deps = [], []
    for raw in lines:
        requirement = raw.split("#", 1)[0].strip()
        if requirement:
            (no_deps if raw.rstrip().endswith(NO_DEPS_MARKER) else normal).append(requirement)
    return normal, no_deps


def resolve(python: str, constraints: list[str]) -> list[str]:
    """Install requirements.in into a fresh venv built from `python`; return its `pip freeze`,
    with the `# no-deps` requirements marked."""
    normal, no_deps = split_no_deps(REQUIREMENTS_IN.read_text().splitlines())
    with tempfile.TemporaryDirectory(prefix="kvstack-lock-") as tmp:
        venv = Path(tmp) / "venv"
        constraints_file = Path(tmp) / "constraints.txt"
        constraints_file.write_text("\n".join(constraints) + "\n")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        install = [*pip, "install", "--quiet", "-c", str(constraints_file)]
        subprocess.run([*install, *normal], check=True)
        if no_deps:
            subprocess.run([*install, "--no-deps", *no_deps], check=True)
        frozen = subprocess.run(
            [*pip, "freeze", "--all", "--exclude", "pip"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    # A local label such as torch's "+cpu" names a build, not a release: `torch==2.13.0` still
    # selects the CPU wheel from this machine's find-links, and stays installable elsewhere.
    no_deps_names = {normalize(n) for n in no_deps}
    pins = []
    for line in frozen.splitlines():
        if not line or line.startswith("#"):
            continue
        pin = line.split("+")[0]
        if normalize(pin.split("==")[0]) in no_deps_names:
            pin = f"{pin}  {NO_DEPS_MARKER}"
        pins.append(pin)
    return sorted(pins, key=str.lower)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter whose version the lock is resolved for (default: this one)",
    )
    parser.add_argument(
        "--upgrade",
        action="append",
        default=[],
        metavar="NAME",
        help="let this package move to the newest version the resolver allows (repeatable)",
    )
    parser.add_argument(
        "--upgrade-all", action="store_true", help="ignore every existing pin and re-resolve"
    )
    args = parser.parse_args(argv)
    version = subprocess.run(
        [args.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    constraints = [] if args.upgrade_all else current_pins({normalize(n) for n in args.upgrade})
    pins = resolve(args.python, constraints)
    REQUIREMENTS_TXT.write_text(HEADER.format(python=version) + "\n".join(pins) + "\n")
    print(f"wrote {len(pins)} pins to {REQUIREMENTS_TXT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
