"""tools/gpu_runner.py: what travels to a GPU runner and what is installed there."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from tools import gpu_runner


def build_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal, valid pure-Python wheel holding one module `<name>_marker`."""
    module = f"{name.replace('-', '_')}_marker"
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{module}.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_installs_only_what_this_python_lacks(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "kvstack-test-missing", "1.0")
    build_wheel(wheels, "pytest", "0.0.1")  # present here: the runner's own must stay
    target = tmp_path / "site"
    assert gpu_runner.install(wheels, target) == 0
    assert (target / "kvstack_test_missing_marker.py").exists()
    assert not (target / "pytest_marker.py").exists()


def test_refuses_to_carry_the_runners_cuda_builds(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "torch", "0.0.1")
    assert gpu_runner.install(wheels, tmp_path / "site") == 1
    assert not (tmp_path / "site").exists()


def test_no_wheels_is_an_error(tmp_path: Path) -> None:
    assert gpu_runner.install(tmp_path, tmp_path / "site") == 1


def test_closure_covers_the_session_tools_but_never_torch() -> None:
    names = gpu_runner.closure([*gpu_runner.SESSION_TOOLS, "torch"], "3.12")
    assert {"nox", "pytest", "pluggy", "colorlog"} <= names
    assert names.isdisjoint(gpu_runner.RUNNER_PROVIDED)


def test_nox_runs_with_the_installed_site_importable() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/gpu_runner.py", "nox", "--version"],
        cwd=gpu_runner.ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # nox prints its version on stderr, after our log line.
    assert proc.stderr.strip().endswith(gpu_runner.read_lock()["nox"])
