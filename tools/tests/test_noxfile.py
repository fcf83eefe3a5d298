"""The noxfile's contract: the sessions the platform promises, and GPU sessions that fail loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tools.tests.lintrunner_config import ROOT


def nox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nox", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def listed(*args: str) -> dict[str, bool]:
    """Session name -> selected, from `nox -l` (`* name` selected, `- name` not)."""
    proc = nox("-l", *args)
    assert proc.returncode == 0, proc.stderr
    found = {}
    for line in proc.stdout.splitlines():
        if line[:2] in ("* ", "- "):
            found[line[2:].split()[0]] = line.startswith("*")
    return found


def test_sessions_and_defaults() -> None:
    sessions = listed()
    assert set(sessions) >= {"lint", "typecheck", "tests", "gpu_tests", "bench", "fmt", "demo"}
    assert {name for name, selected in sessions.items() if selected} == {
        "lint",
        "typecheck",
        "tests",
    }


def test_ci_tag_selects_what_ci_runs() -> None:
    selected = {name for name, chosen in listed("-t", "ci").items() if chosen}
    assert selected == {"lint", "typecheck", "tests"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_gpu_tests_fail_without_a_cuda_device() -> None:
    proc = nox("-s", "gpu_tests")
    assert proc.returncode != 0
    assert "no CUDA device is visible" in proc.stderr + proc.stdout
