"""The console script, called through main([...])."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from kvstack.transfer.cli import main


def test_bench_quick_writes_schema_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["--log-level", "WARNING", "bench", "--quick", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "kvstack-bench/1"
    assert doc["suite"] == "transfer"
    assert set(doc) == {
        "schema",
        "suite",
        "created",
        "git_commit",
        "machine",
        "versions",
        "results",
    }
    assert set(doc["machine"]) == {"cpu_model", "cpu_count", "gpu"}
    names = [r["name"] for r in doc["results"]]
    assert len(names) == len(set(names))
    for r in doc["results"]:
        assert set(r) == {
            "name", "metric", "unit", "value", "baseline", "ratio",
            "higher_is_better", "target", "limit", "params",
        }  # fmt: skip
        assert set(r["baseline"]) == {"name", "value"}
        assert r["value"] > 0
        assert r["baseline"]["value"] > 0
    assert any(n.startswith("shm write") for n in names)
    assert any(n.startswith("tcp read") for n in names)
    assert any("latency p99" in n for n in names)
    table = capsys.readouterr().out
    assert "ratio" in table
    assert "shm write" in table


def test_metadata_port_in_use_fails_cleanly() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--log-level", "ERROR", "metadata", "--port", str(port)]) == 1


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
