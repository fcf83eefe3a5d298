"""``kvstack-transfer bench``: the issue's cases, each raced against its baseline in one run.

Two processes: this one (the initiator) and a ``_peer`` process that owns the target segments.
Every case interleaves ours and the baseline rep by rep, after a warm-up, and reports medians
(p20/p80 in params) or p50/p99 latencies in the ``kvstack-bench/1`` JSON (tools/bench/SCHEMA.md).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstack.transfer._config import EngineConfig, format_size
from kvstack.transfer._cuda import cuda_available
from kvstack.transfer._engine import Engine
from kvstack.transfer._metadata_server import serve_in_thread
from kvstack.transfer._peer import PLAIN_HEADER, PeerProcess
from kvstack.transfer._types import Op, TransferRequest

__all__ = ["BenchSizes", "run_bench"]

SCHEMA = "kvstack-bench/1"
GB = 1e9


@dataclass(frozen=True, slots=True)
class BenchSizes:
    big_bytes: int  # the "64 MiB" of the issue
    reps: int  # timed reps per side for throughput cases
    latency_ops: int  # timed 4 KiB writes per side
    pages: int  # pages in the scattered batch
    page_bytes: int
    gpu_bytes: int  # the "1 GiB" GPU case


FULL = BenchSizes(64 << 20, 30, 5000, 256, 16 << 10, 1 << 30)
# --quick: a CI smoke test of the whole path in seconds; its numbers are not the issue's.
QUICK = BenchSizes(4 << 20, 3, 200, 64, 16 << 10, 64 << 20)


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q))


def _result(
    name: str,
    *,
    metric: str,
    unit: str,
    value: float,
    baseline_name: str,
    baseline_value: float,
    higher_is_better: bool,
    target: float | None,
    limit: dict[str, Any] | None = None,
    params: dict[str, Any],
) -> dict[str, Any]:
    if higher_is_better:
        ratio = value / baseline_value if baseline_value else 0.0
    else:
        ratio = baseline_value / value if value else 0.0
    return {
        "name": name,
        "metric": metric,
        "unit": unit,
        "value": round(value, 4),
        "baseline": {"name": baseline_name, "value": round(baseline_value, 4)},
        "ratio": round(ratio, 4),
        "higher_is_better": higher_is_better,
        "target": target,
        "limit": limit,
        "params": params,
    }


def _race(fns: Sequence[Callable[[], None]], reps: int) -> list[list[float]]:
    """Seconds per call of each, interleaved rep by rep (in the order given) after one warm-up
    call of each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(reps):
        for fn, seconds in zip(fns, times, strict=True):
            t0 = clock()
            fn()
            seconds.append(clock() - t0)
    return times


def _throughput(
    name: str,
    baseline_name: str,
    size: int,
    times: Sequence[list[float]],
    target: float | None,
) -> dict[str, Any]:
    ours = [size / t / GB for t in times[0]]
    base = [size / t / GB for t in times[1]]
    return _result(
        name,
        metric="throughput",
        unit="GB/s",
        value=_q(ours, 0.5),
        baseline_name=baseline_name,
        baseline_value=_q(base, 0.5),
        higher_is_better=True,
        target=target,
        params={
            "size_bytes": size,
            "reps": len(ours),
            "p20": round(_q(ours, 0.2), 4),
            "p80": round(_q(ours, 0.8), 4),
            "baseline_p20": round(_q(base, 0.2), 4),
            "baseline_p80": round(_q(base, 0.8), 4),
        },
    )


class _Plain:
    """The plain-socket baseline: sendall/recv_into over loopback, framing of 9 bytes."""

    def __init__(self, port: int, size: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = memoryview(bytearray(size))
        self.ack = bytearray(1)

    def write(self, length: int) -> None:
        self.sock.sendall(PLAIN_HEADER.pack(b"W", length))
        self.sock.sendall(self.buffer[:length])
        self._recv(memoryview(self.ack))

    def read(self, length: int) -> None:
        self.sock.sendall(PLAIN_HEADER.pack(b"R", length))
        self._recv(self.buffer[:length])

    def _recv(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            n = self.sock.recv_into(view[pos:])
            if n == 0:
                raise ConnectionError("plain baseline server closed the connection")
            pos += n

    def close(self) -> None:
        self.sock.close()


def _machine(gpu: str | None) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "gpu": gpu}


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "torch", "kvstack-transfer"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _latency(
    name: str,
    baseline_name: str,
    *,
    ours: Callable[[], None],
    baseline: Callable[[], None],
    ops: int,
    limit_p50_us: float,
) -> list[dict[str, Any]]:
    for _ in range(min(100, ops)):  # warm-up: connections, page faults, caches
        ours()
        baseline()
    t_ours: list[float] = []
    t_base: list[float] = []
    clock = time.perf_counter
    for _ in range(ops):
        t0 = clock()
        ours()
        t1 = clock()
        baseline()
        t2 = clock()
        t_ours.append((t1 - t0) * 1e6)
        t_base.append((t2 - t1) * 1e6)
    params = {"size_bytes": 4096, "ops": ops}
    return [
        _result(
            f"{name} p{q}",
            metric=f"latency_p{q}",
            unit="us",
            value=_q(t_ours, q / 100),
            baseline_name=f"{baseline_name} p{q}",
            baseline_value=_q(t_base, q / 100),
            higher_is_better=False,
            target=None,
            limit={"op": "<=", "value": limit},
            params=params,
        )
        for q, limit in ((50, limit_p50_us), (99, 1000.0))
    ]


def run_bench(
    *, quick: bool = False, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run every case; returns the kvstack-bench/1 document."""
    sizes = QUICK if quick else FULL
    big, page = sizes.big_bytes, sizes.page_bytes
    big_label = format_size(big)
    rng = np.random.default_rng(0)
    # Scattered pages: distinct random slots in a region 4x the batch, on both sides.
    slots = 4 * sizes.pages
    remote_slots = rng.choice(slots, sizes.pages, replace=False)
    local_slots = rng.choice(slots, sizes.pages, replace=False)
    results: list[dict[str, Any]] = []
    gpu_name: str | None = None

    url, stop_metadata = serve_in_thread()
    peer_segments = [f"dst:{big}:shm", f"kv:{slots * page}:shm"]
    try:
        with (
            PeerProcess(url, peer_segments) as peer,
            Engine(EngineConfig(metadata_url=url)) as engine,
        ):
            src = engine.allocate("src", big)
            src[:] = rng.integers(0, 256, big, dtype=np.uint8)
            engine.allocate("pages", slots * page)
            copy_dst = np.empty_like(src)  # in-process memcpy baseline
            plain = _Plain(int(peer.command(f"plain {big}")), big)
            try:
                for transport in ("shm", "tcp"):
                    for op in (Op.WRITE, Op.READ):
                        case = f"{transport} {op} {big_label}"
                        progress(case)
                        fn = engine.write if op is Op.WRITE else engine.read

                        def ours(fn: Callable[..., None] = fn, transport: str = transport) -> None:
                            fn("src", "dst", big, transport=transport)

                        if transport == "shm":
                            base_name = f"numpy copyto {big_label}"

                            def baseline() -> None:
                                np.copyto(copy_dst, src)

                            target = 0.85
                        else:
                            base_name = f"socket sendall/recv_into {big_label}"
                            baseline = (
                                (lambda: plain.write(big))
                                if op is Op.WRITE
                                else (lambda: plain.read(big))
                            )
                            target = 0.9
                        results.append(
                            _throughput(
                                case, base_name, big, _race([ours, baseline], sizes.reps), target
                            )
                        )
                small = np.empty(4096, dtype=np.uint8)
                for transport, base_name, baseline, limit in (
                    ("shm", "numpy copyto 4 KiB", lambda: np.copyto(small, src[:4096]), 30.0),
                    ("tcp", "socket write+ack 4 KiB", lambda: plain.write(4096), 60.0),
                ):
                    progress(f"{transport} write 4 KiB latency")
                    results += _latency(
                        f"{transport} write 4 KiB latency",
                        base_name,
                        ours=lambda t=transport: engine.write("src", "dst", 4096, transport=t),
                        baseline=baseline,
                        ops=sizes.latency_ops,
                        limit_p50_us=limit,
                    )
                # The row is the array API (submit_pages); the same pages as a list of
                # TransferRequests (submit) are raced beside it, so the difference shows.
                local_offsets = local_slots * page
                remote_offsets = remote_slots * page
                requests = [
                    TransferRequest(Op.WRITE, "pages", lo, "kv", ro, page)
                    for lo, ro in zip(local_offsets.tolist(), remote_offsets.tolist(), strict=True)
                ]
                for transport in ("shm", "tcp"):
                    case = f"{transport} batch {sizes.pages} x {format_size(page)} pages"
                    progress(case)

                    def arrays(t: str = transport) -> None:
                        engine.transfer_pages(
                            Op.WRITE,
                            "pages",
                            "kv",
                            local_offsets=local_offsets,
                            remote_offsets=remote_offsets,
                            lengths=page,
                            transport=t,
                        )

                    def request_list(t: str = transport) -> None:
                        engine.transfer(requests, transport=t)

                    def whole(t: str = transport) -> None:
                        engine.write("src", "dst", big, transport=t)

                    # Each page batch follows a 64 MiB write, as before: both start cold.
                    t_arrays, t_whole, t_list, t_whole_again = _race(
                        [arrays, whole, request_list, whole], sizes.reps
                    )
                    batch_bytes = sizes.pages * page
                    whole_rate = [big / t / GB for t in t_whole + t_whole_again]
                    for name, api, times in (
                        (case, "submit_pages", t_arrays),
                        (f"{case}, request list", "submit", t_list),
                    ):
                        rate = [batch_bytes / t / GB for t in times]
                        results.append(
                            _result(
                                name,
                                metric="throughput",
                                unit="GB/s",
                                value=_q(rate, 0.5),
                                baseline_name=f"{transport} write {big_label}",
                                baseline_value=_q(whole_rate, 0.5),
                                higher_is_better=True,
                                target=0.6,
                                params={
                                    "pages": sizes.pages,
                                    "page_bytes": page,
                                    "reps": sizes.reps,
                                    "api": api,
                                    "p20": round(_q(rate, 0.2), 4),
                                    "p80": round(_q(rate, 0.8), 4),
                                },
                            )
                        )
            finally:
                plain.close()
        gpu_name = _gpu_case(sizes, results, url, progress)
    finally:
        stop_metadata()
    return {
        "schema": SCHEMA,
        "suite": "transfer",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": _machine(gpu_name),
        "versions": _versions(),
        "results": results,
    }


def _gpu_case(
    sizes: BenchSizes, results: list[dict[str, Any]], url: str, progress: Callable[[str], None]
) -> str | None:
    """Cross-process same-GPU copy vs an in-process torch device-to-device copy (CUDA only)."""
    if not cuda_available():
        return None
    torch = importlib.import_module("torch")
    size = sizes.gpu_bytes
    label = format_size(size)
    case = f"cuda write {label} cross-process same GPU"
    progress(case)
    with (
        PeerProcess(url, [f"gpu:{size}:cuda"]) as _peer,
        Engine(EngineConfig(metadata_url=url)) as engine,
    ):
        src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        engine.register("gpu-src", src)

        def ours() -> None:
            engine.write("gpu-src", "gpu", size, transport="cuda")

        def baseline() -> None:
            dst.copy_(src)
            torch.cuda.synchronize()

        results.append(
            _throughput(
                case, f"torch d2d copy {label}", size, _race([ours, baseline], sizes.reps), 0.9
            )
        )
    return str(torch.cuda.get_device_name())


def format_table(document: dict[str, Any]) -> str:
    """The results as an aligned text table (stdout of ``kvstack-transfer bench``)."""
    rows = [("case", "ours", "baseline", "ratio", "target", "meets")]
    for r in document["results"]:
        target = r["target"]
        limit = r["limit"]
        meets = (target is None or r["ratio"] >= target) and (
            limit is None
            or (
                r["value"] <= limit["value"]
                if limit["op"] == "<="
                else r["value"] >= limit["value"]
            )
        )
        goal = []
        if target is not None:
            goal.append(f">= {target}")
        if limit is not None:
            goal.append(f"{limit['op']} {limit['value']:g} {r['unit']}")
        rows.append(
            (
                r["name"],
                f"{r['value']:.3f} {r['unit']}",
                f"{r['baseline']['value']:.3f} ({r['baseline']['name']})",
                f"{r['ratio']:.2f}",
                ", ".join(goal) or "-",
                "yes" if meets else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    machine = document["machine"]
    lines = [f"machine: {machine['cpu_model']} x{machine['cpu_count']}, gpu: {machine['gpu']}"]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
