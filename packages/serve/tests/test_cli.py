"""``kvstack-serve`` bench and demo, run through ``main()`` against real server processes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvstack.serve import ServerProcess
from kvstack.serve.cli import main
from tools.bench.schema import load as load_bench_json


def test_bench_quick_writes_valid_schema(
    tiny_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--base-url",
            tiny_server.url,
            "--quick",
            "--goodput",
            "ttft:60000",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "TTFT p99 (ms)" in printed.out
    assert "load [" in printed.err  # progress goes to stderr
    document = load_bench_json(out)  # raises SchemaError naming every problem
    names = {r["name"] for r in document["results"]}
    assert {"load: output throughput", "load: ttft p50", "load: goodput"} <= names
    probe = next(r for r in document["results"] if r["name"].startswith("ttft "))
    assert probe["name"] == "ttft 256-token prompt, prefix cached"
    assert probe["baseline"]["name"] == "ttft 256-token prompt, cold"
    assert len(probe["params"]["cold_ms"]) == len(probe["params"]["cached_ms"]) == 1
    for result in document["results"]:
        if result is not probe:
            assert result["params"]["num_prompts"] == 8
            assert result["baseline"]["name"].startswith("sequential")


def test_bench_shared_prefix_hits_the_cache(
    tiny_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows_path = tmp_path / "requests.jsonl"
    args = [
        "bench",
        "--base-url",
        tiny_server.url,
        "--dataset",
        "shared-prefix",
        "--num-groups",
        "2",
    ]
    args += [
        "--prompts-per-group",
        "4",
        "--prefix-len",
        "64",
        "--suffix-len",
        "8",
        "--output-len",
        "4",
    ]
    args += ["--max-concurrency", "2", "--baseline-requests", "1", "--per-request", str(rows_path)]
    assert main(args) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert [r["run"] for r in rows] == ["sequential"] + ["load"] * 8
    assert all(r["ok"] and r["completion_tokens"] == 4 and r["ttft_s"] > 0 for r in rows)
    table = capsys.readouterr().out
    # Client side (usage.cached_tokens) and server side (/metrics counters) both see hits.
    for row in ("prefix cache hit rate", "server: prefix cache hit rate"):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert float(line.split()[-1].rstrip("%")) > 0, line


def test_bench_sharegpt_file(tiny_server: ServerProcess, tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}?"},
                {"from": "gpt", "value": "An answer."},
            ]
        }
        for i in range(5)
    ]
    data.append({"conversations": [{"from": "human", "value": "no reply"}]})  # skipped
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    args = [
        "bench",
        "--base-url",
        tiny_server.url,
        "--dataset",
        "sharegpt",
        "--dataset-path",
        str(path),
    ]
    args += [
        "--num-prompts",
        "4",
        "--output-len",
        "4",
        "--request-rate",
        "50",
        "--baseline-requests",
        "1",
    ]
    assert main(args) == 0


def test_bench_reports_bad_arguments(tiny_server: ServerProcess, tmp_path: Path) -> None:
    assert main(["bench", "--base-url", tiny_server.url, "--goodput", "latency:5", "--quick"]) == 2
    missing = tmp_path / "missing.json"
    assert (
        main(
            [
                "bench",
                "--base-url",
                tiny_server.url,
                "--dataset",
                "sharegpt",
                "--dataset-path",
                str(missing),
            ]
        )
        == 2
    )
    assert main(["up", "--port", "70000"]) == 2


def test_demo_runs_the_stack_and_shuts_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.json"
    assert main(["demo", "--model", "tiny", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chat  user: What is the capital of France?" in printed
    assert "output throughput (tok/s)" in printed
    assert "ttft 1016-token prompt, prefix cached:" in printed  # capped by tiny's context
    # The second prefill worker reads the first one's blocks from the store.
    reuse = re.search(r"prefill worker 2, which read (\d+) tokens of KV from the store", printed)
    assert reuse, printed[-2000:]
    assert int(reuse.group(1)) >= 16 * 62
    assert "server stopped (exit code 0)" in printed
    load_bench_json(out)
