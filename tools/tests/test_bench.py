"""The benchmark schema (tools/bench/schema.py) and the report built from it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tools.bench import report, schema
from tools.tests.lintrunner_config import ROOT


def result(name: str = "shm write 64 MiB", **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "metric": "throughput",
        "unit": "GB/s",
        "value": 9.0,
        "baseline": {"name": "numpy copyto", "value": 10.0},
        "ratio": 0.9,
        "higher_is_better": True,
        "target": 0.85,
        "limit": None,
        "params": {"size_bytes": 64 << 20},
    }
    base.update(changes)
    return base


def document(*results: dict[str, Any]) -> dict[str, Any]:
    return schema.make_document(
        "transfer", list(results) or [result()], versions={"numpy": "2.4.6"}, root=ROOT
    )


def test_a_complete_document_is_valid() -> None:
    doc = document()
    assert schema.validate(doc) == []
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["versions"]["python"].count(".") == 2


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (lambda d: d.pop("suite"), "missing 'suite'"),
        (lambda d: d.update(schema="kvstack-bench/0"), "'schema' must be"),
        (lambda d: d["machine"].update(gpu=3), "'gpu' must be"),
        (lambda d: d["results"][0].update(value=float("nan")), "'value' must be a number"),
        (lambda d: d["results"][0].update(ratio="0.9"), "'ratio' must be a number"),
        (lambda d: d["results"][0].pop("target"), "missing 'target'"),
        (lambda d: d["results"][0]["baseline"].pop("value"), "results[0].baseline: missing"),
        (lambda d: d["results"][0].update(limit={"op": "<", "value": 1}), "'limit' must be"),
        (lambda d: d["results"].append(copy.deepcopy(d["results"][0])), "duplicate names"),
    ],
    ids=[
        "no-suite",
        "wrong-schema",
        "gpu-not-a-name",
        "nan-value",
        "ratio-as-text",
        "no-target",
        "baseline-without-value",
        "bad-limit-op",
        "duplicate-case",
    ],
)
def test_each_planted_fault_is_named(fault: Any, expected: str) -> None:
    doc = document()
    fault(doc)
    problems = schema.validate(doc)
    assert any(expected in p for p in problems), problems


def test_make_document_refuses_an_invalid_result() -> None:
    with pytest.raises(ValueError, match="invalid document"):
        document(result(unit=""))


@pytest.mark.parametrize(
    ("changes", "met"),
    [
        ({}, True),
        ({"ratio": 0.5}, False),
        ({"target": None}, None),
        ({"target": None, "limit": {"op": "<=", "value": 10.0}}, True),
        ({"target": None, "limit": {"op": "<=", "value": 8.0}}, False),
        ({"limit": {"op": ">=", "value": 8.0}, "ratio": 0.5}, False),
    ],
)
def test_meets_targets(changes: dict[str, Any], met: bool | None) -> None:
    assert schema.meets_targets(result(**changes)) is met


def test_report_writes_a_table_and_plots(tmp_path: Path) -> None:
    doc = document(result(), result("tcp read 64 MiB", ratio=0.5, value=5.0))
    (tmp_path / "transfer.json").write_text(json.dumps(doc))
    assert report.main([str(tmp_path), "--not-run", "kernels=needs a CUDA device"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| shm write 64 MiB | throughput | 9 GB/s | numpy copyto: 10 GB/s | 0.900 |" in summary
    assert "| tcp read 64 MiB |" in summary
    assert "**no**" in summary
    assert "- kernels: needs a CUDA device" in summary
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_an_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = document()
    del doc["machine"]
    (tmp_path / "broken.json").write_text(json.dumps(doc))
    assert report.main([str(tmp_path), "--no-plots"]) == 1
    assert "broken.json is not a valid kvstack-bench/1 document" in capsys.readouterr().err
