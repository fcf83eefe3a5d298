"""The command line: stats, metrics, and a quick bench run that writes schema-shaped JSON."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kvstack.store.cli import main
from tools.bench.schema import load as load_bench_json

from .conftest import SHARED_HEARTBEAT_TIMEOUT_S, Cluster, free_port


def test_stats_prints_json(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-level", "WARNING", "stats", "--master", cluster.address]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {"objects", "used_bytes", "capacity_bytes", "nodes"} <= set(stats)


def test_stats_names_an_unreachable_master(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert main(["--log-level", "WARNING", "stats", "--master", address]) == 1
    assert f"master at {address} unavailable" in capsys.readouterr().err


def test_metrics_exported(make_cluster: Cluster) -> None:
    port = free_port()
    make_cluster.start_master(
        "--metrics-port", str(port), heartbeat_timeout_s=SHARED_HEARTBEAT_TIMEOUT_S
    )
    make_cluster.start_node("m0", "8MiB")
    client = make_cluster.client()
    client.put("k", b"v")
    client.get("k")
    with pytest.raises(KeyError):
        client.get("missing")
    client.stats()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    for name in (
        "kvstack_store_objects 1.0",
        "kvstack_store_hits_total 1.0",
        "kvstack_store_misses_total 1.0",
        'kvstack_store_used_bytes{node="m0"',
        'kvstack_store_op_seconds_bucket{le="0.001",op="GET"}',
        "kvstack_store_evictions_total",
        "kvstack_store_lease_waits_total",
    ):
        assert name in text, name


def test_bench_quick_writes_schema_json(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvstack.store", "--log-level", "WARNING", "bench", "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 KiB get p50" in proc.stdout  # the table on stdout, progress on stderr
    assert "[bench]" in proc.stderr
    document = load_bench_json(out)  # validates against kvstack-bench/1
    assert document["suite"] == "store"
    names = [r["name"] for r in document["results"]]
    assert len(names) == len(set(names))
    assert {"4 KiB put p50", "1 MiB get", "batch get_into 64 x 1 MiB"} <= set(names)
    for result in document["results"]:
        assert result["value"] > 0
        assert result["baseline"]["value"] > 0


def test_node_refuses_more_memory_than_the_host_has(cluster: Cluster) -> None:
    """A node commits its memory at start: asking for more than /dev/shm holds is a clear error
    and a prompt exit, not a SIGBUS in some client later (nor a node that hangs on its way out)."""
    too_big = 2 * shutil.disk_usage("/dev/shm").total
    done = subprocess.run(
        [sys.executable, "-m", "kvstack.store", "--log-level", "WARNING", "node",
         "--master", cluster.address, "--memory", str(too_big), "--segment", str(too_big)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"kvstack-store node: cannot commit {too_big} bytes of shared memory" in done.stderr
    assert "Traceback" not in done.stderr


def test_master_stops_cleanly_on_ctrl_c_with_connections_open() -> None:
    """Ctrl-C with a client's metadata connection still open: a clean exit, no asyncio
    "Exception in callback" traceback (the handler used to be cancelled under the loop)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstack.store", "--log-level", "WARNING", "master", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"metadata http://([\d.]+):(\d+)", line)
        assert found, line
        with socket.create_connection((found[1], int(found[2])), timeout=10) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(1024).startswith(b"HTTP/1.1 200")  # served, kept open
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "Exception in callback" not in stderr
