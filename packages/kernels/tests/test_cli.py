"""The ``kvstack-kernels`` command line, run in-process on whatever device the tests use.

On CPU the kernels run on the Triton interpreter, so these are smoke runs of every code path
(the numbers mean nothing there); the JSON must still follow kvstack-bench/1.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

import pytest

from kvstack.kernels.cli import main

RESULT_KEYS = {
    "name",
    "metric",
    "unit",
    "value",
    "baseline",
    "ratio",
    "higher_is_better",
    "target",
    "limit",
    "params",
}


def _check_document(path: Path) -> dict:
    document = json.loads(path.read_text())
    assert document["schema"] == "kvstack-bench/1"
    assert document["suite"] == "kernels"
    assert set(document["machine"]) == {"cpu_model", "cpu_count", "gpu"}
    assert {"python", "torch", "triton"} <= set(document["versions"])
    names = [r["name"] for r in document["results"]]
    assert len(names) == len(set(names)), "result names must be unique within the suite"
    for result in document["results"]:
        assert set(result) == RESULT_KEYS
        if result["baseline"] is not None:
            assert set(result["baseline"]) == {"name", "value"}
    return document


def test_probe_quick_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "probe.json"

    assert main(["probe", "--quick", "--json", str(path)]) == 0

    out = capsys.readouterr().out
    assert "accumulator probe on" in out
    assert "fp8e4m3 K32 w4" in out
    assert "fp16 K32 w4" in out
    document = _check_document(path)
    assert [r["metric"] for r in document["results"]] == ["accumulator_mantissa_bits"] * 2


# Split so each case stays near a second on the interpreter.
@pytest.mark.parametrize(
    ("cases", "kinds"), [(["decode", "split"], {"decode"}), (["prefill"], {"prefill"})]
)
def test_bench_quick_attention_cases(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    cases: list[str],
    kinds: set[str],
) -> None:
    path = tmp_path / "bench.json"

    with caplog.at_level(logging.INFO):
        assert main(["bench", "--quick", "--cases", *cases, "--json", str(path)]) == 0

    assert "kvstack-kernels bench on" in capsys.readouterr().out
    assert cases[0] in caplog.text  # progress is logged (stderr), not printed
    document = _check_document(path)
    results = {r["name"].split()[0]: r for r in document["results"]}
    assert set(results) == kinds
    for result in document["results"]:
        assert result["ratio"] is not None
        assert result["target"] in (0.85, 0.7, 0.8)
    if "decode" in results:
        # One alternative configuration is timed even in --quick mode.
        (batched,) = [r for r in document["results"] if "split" not in r["name"]]
        assert len(batched["params"]["sweep_us"]) == 1
        assert batched["params"]["sweep_best"] in batched["params"]["sweep_us"]
    if "prefill" in results:
        # The prefill case checks itself against SDPA on the same inputs.
        # (bf16 on a GPU, fp16 on the interpreter.)
        assert results["prefill"]["params"]["max_abs_diff_vs_sdpa"] < 5e-2


def test_bench_quick_pack_and_probe(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"

    assert main(["bench", "--quick", "--cases", "pack", "probe", "--json", str(path)]) == 0

    document = _check_document(path)
    packs = [r for r in document["results"] if r["metric"] == "throughput"]
    assert [r["name"].split()[0] for r in packs] == ["pack", "unpack"]
    assert all(r["params"]["round_trip_bit_exact"] for r in packs)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["probe", "--dtypes", "bf16"])
    assert excinfo.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m kvstack.kernels`` runs main() and exits with its status."""
    monkeypatch.setattr(sys, "argv", ["kvstack-kernels", "--help"])
    with pytest.raises(SystemExit) as excinfo:
        runpy.run_module("kvstack.kernels", run_name="__main__")
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "probe" in out
    assert "bench" in out
