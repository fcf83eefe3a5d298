"""``kvstack-store bench``: the store against a real redis-server, side by side in one run.

A master and one node run as their own processes (as deployed); a redis-server is started on
a free port; the same values go to both from the same number of client threads, in
interleaved rounds after a warm-up. Cases and targets come from issue 4.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis

from kvstack.store._allocator import SegmentAllocator
from kvstack.store._client import StoreClient
from kvstack.store._config import ClientConfig
from kvstack.store.errors import StoreError
from kvstack.transfer import Engine, EngineConfig, Op, TransferRequest

__all__ = ["format_table", "run_bench"]

KiB, MiB = 1 << 10, 1 << 20
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class _Sizes:
    small_ops: int  # 4 KiB ops per system per thread
    big_ops: int  # 1 MiB ops per system
    batch_reps: int  # 64 x 1 MiB batch gets per system
    alloc_ops: int
    node_memory: str


FULL = _Sizes(small_ops=4000, big_ops=200, batch_reps=20, alloc_ops=200_000, node_memory="1GiB")
QUICK = _Sizes(small_ops=300, big_ops=20, batch_reps=3, alloc_ops=20_000, node_memory="256MiB")
ROUND = 50  # ops per system before switching: interleaved so noise hits both alike


def _steady_heap() -> None:
    """Keep freed 1 MiB buffers in this process's heap (glibc), for both systems alike.

    With glibc's default, sliding mmap threshold, whether a 1 MiB buffer comes from a fresh
    mapping (256 page faults) or the warm heap depends on what this process allocated before:
    redis-py's 1 MiB GET ran 0.34 GB/s alone (~985 faults a call) and 1.3-1.7 GB/s after the
    store's gets had moved the threshold, so the baseline changed with our own code (issue 4,
    2026-11-27). A fixed threshold gives Redis its warm-heap rate in every run.
    """
    if sys.platform != "linux":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum on 64-bit
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep freed memory instead of returning it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_line(proc: subprocess.Popen[str]) -> str:
    stdout = proc.stdout
    if stdout is None:
        raise StoreError("child has no stdout")
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        if not sel.select(_START_TIMEOUT_S):
            raise StoreError(f"{proc.args} printed nothing within {_START_TIMEOUT_S:g} s")
    return stdout.readline()


@contextmanager
def _store(node_memory: str) -> Generator[str, None, None]:
    """A master and one node, each its own process; yields the master address."""
    cmd = [sys.executable, "-m", "kvstack.store", "--log-level", "WARNING"]
    procs: list[subprocess.Popen[str]] = []
    try:
        master = subprocess.Popen(
            [*cmd, "master", "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        procs.append(master)
        line = _first_line(master)
        if "listening on " not in line:
            raise StoreError(f"master did not start: {line!r}")
        address = line.split("listening on ", 1)[1].split()[0]
        node = subprocess.Popen(
            [*cmd, "node", "--master", address, "--memory", node_memory, "--name", "bench"],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(node)
        if "registered" not in _first_line(node):
            raise StoreError("node did not register")
        yield address
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


@contextmanager
def _redis() -> Generator[redis.Redis, None, None]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise StoreError("redis-server not found on PATH: the bench compares with a real one")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise StoreError(f"redis-server did not start on port {port}") from None
                time.sleep(0.02)  # polling a port with a deadline
        yield client
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _latencies(fn: Callable[[int], None], n: int, threads: int) -> tuple[list[float], float]:
    """Per-op seconds of ``n`` calls on each of ``threads`` threads, and the wall time."""
    out: list[list[float]] = [[] for _ in range(threads)]

    def run(t: int) -> None:
        lat = out[t]
        base = t * n
        for i in range(n):
            start = time.perf_counter()
            fn(base + i)
            lat.append(time.perf_counter() - start)

    start = time.perf_counter()
    if threads == 1:  # on this thread: a thread's start and join are not the op's time
        run(0)
        return out[0], time.perf_counter() - start
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [x for lat in out for x in lat], time.perf_counter() - start


def _race(
    ours: Callable[[int], None],
    base: Callable[[int], None],
    n: int,
    threads: int,
    *,
    round_ops: int = ROUND,
) -> tuple[tuple[list[float], float], tuple[list[float], float]]:
    """Interleave rounds of ``round_ops`` ops per thread; returns (latencies, wall) for each
    side."""
    results: list[tuple[list[float], float]] = [([], 0.0), ([], 0.0)]
    done = 0
    while done < n:
        k = min(round_ops, n - done)
        for side, fn in enumerate((ours, base)):
            offset = done * threads

            def shifted(i: int, fn: Callable[[int], None] = fn, offset: int = offset) -> None:
                fn(offset + i)

            lat, wall = _latencies(shifted, k, threads)
            results[side][0].extend(lat)
            results[side] = (results[side][0], results[side][1] + wall)
        done += k
    return results[0], results[1]


def _spread(prefix: str, seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max of per-op ``seconds``, in microseconds, named with ``prefix``."""
    return {
        f"{prefix}p50_us": round(_pct(seconds, 50) * 1e6, 1),
        f"{prefix}p99_us": round(_pct(seconds, 99) * 1e6, 1),
        f"{prefix}max_us": round(max(seconds) * 1e6, 1),
    }


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _result(
    name: str,
    metric: str,
    unit: str,
    *,
    value: float,
    base_name: str,
    base_value: float,
    higher_is_better: bool,
    target: float | None,
    limit: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if higher_is_better:
        ratio = value / base_value if base_value else 0.0
    else:
        ratio = base_value / value if value else 0.0
    return {
        "name": name,
        "metric": metric,
        "unit": unit,
        "value": round(value, 4),
        "baseline": {"name": base_name, "value": round(base_value, 4)},
        "ratio": round(ratio, 4),
        "higher_is_better": higher_is_better,
        "target": target,
        "limit": limit,
        "params": params or {},
    }


class _FirstFit:
    """The plain alternative the allocator is compared with: a sorted free list, first fit."""

    def __init__(self, capacity: int) -> None:
        self.starts = [0]
        self.sizes = [capacity]

    def allocate(self, size: int) -> int | None:
        for i, length in enumerate(self.sizes):
            if length >= size:
                start = self.starts[i]
                if length == size:
                    del self.starts[i], self.sizes[i]
                else:
                    self.starts[i] += size
                    self.sizes[i] -= size
                return start
        return None

    def free(self, offset: int, size: int) -> None:
        i = bisect.bisect(self.starts, offset)
        self.starts.insert(i, offset)
        self.sizes.insert(i, size)
        if i + 1 < len(self.starts) and offset + size == self.starts[i + 1]:
            self.sizes[i] += self.sizes.pop(i + 1)
            self.starts.pop(i + 1)
        if i > 0 and self.starts[i - 1] + self.sizes[i - 1] == offset:
            self.sizes[i - 1] += self.sizes.pop(i)
            self.starts.pop(i)


def _alloc_rate(make: Callable[[], Any], ops: int) -> float:
    """Allocations per second under churn: KV-page-like sizes, a steady population of 2,000."""
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.choice([4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB], ops)]
    victims = [int(v) for v in rng.integers(0, 2000, ops)]
    alloc = make()
    live: list[tuple[int, int]] = []
    start = time.perf_counter()
    for size, victim in zip(sizes, victims, strict=True):
        if len(live) >= 2000:
            offset, old = live[victim]
            live[victim] = live[-1]
            live.pop()
            alloc.free(offset, old)
        offset = alloc.allocate(size)
        if offset is not None:
            live.append((offset, size))
    return ops / (time.perf_counter() - start)


_Call = Callable[[int], None]


def _small_ops(client: StoreClient, red: redis.Redis, op: str, value: bytes) -> tuple[_Call, _Call]:
    """(ours, redis) for op "put" or "get" of 4 KiB values under distinct keys."""

    def ours_put(i: int) -> None:
        client.put(f"s{i}", value)

    def base_put(i: int) -> None:
        red.set(f"s{i}", value)

    def ours_get(i: int) -> None:
        client.get(f"s{i}")

    def base_get(i: int) -> None:
        red.get(f"s{i}")

    return (ours_put, base_put) if op == "put" else (ours_get, base_get)


def _big_ops(client: StoreClient, red: redis.Redis, op: str, value: bytes) -> tuple[_Call, _Call]:
    """(ours, redis) for op "put" or "get" of 1 MiB values over 64 keys."""

    def ours_put(i: int) -> None:
        client.put(f"b{i % 64}", value, overwrite=True)

    def base_put(i: int) -> None:
        red.set(f"b{i % 64}", value)

    def ours_get(i: int) -> None:
        client.get(f"b{i % 64}")

    def base_get(i: int) -> None:
        red.get(f"b{i % 64}")

    return (ours_put, base_put) if op == "put" else (ours_get, base_get)


def _progress(text: str) -> None:
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


def run_bench(
    *,
    quick: bool = False,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every case; returns the kvstack-bench/1 document."""
    say = progress or _progress
    sizes = QUICK if quick else FULL
    _steady_heap()
    results: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, 4 * KiB, dtype=np.uint8).tobytes()
    big = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
    params = {"threads": threads}

    with _store(sizes.node_memory) as address, _redis() as red:
        client = StoreClient(ClientConfig(master=address))
        try:
            # -- 4 KiB put and get: latency and ops/s ------------------------------------
            say("warm-up")
            for i in range(100):
                client.put(f"warm{i}", small)
                client.get(f"warm{i}")
                red.set(f"warm{i}", small)
                red.get(f"warm{i}")
            for op in ("put", "get"):
                say(f"4 KiB {op} x {sizes.small_ops} x {threads} threads")
                ours, base = _small_ops(client, red, op, small)
                (ol, ow), (bl, bw) = _race(ours, base, sizes.small_ops, threads)
                target = 1 / 2.5 if op == "put" else 1 / 1.5
                for q, label in ((50, "p50"), (99, "p99")):
                    results.append(
                        _result(
                            f"4 KiB {op} {label}",
                            f"latency_{label}",
                            "us",
                            value=_pct(ol, q) * 1e6,
                            base_name=f"redis {'SET' if op == 'put' else 'GET'} 4 KiB {label}",
                            base_value=_pct(bl, q) * 1e6,
                            higher_is_better=False,
                            target=target if q == 50 else None,
                            params={**params, "value_bytes": 4 * KiB},
                        )
                    )
                n = sizes.small_ops * threads
                results.append(
                    _result(
                        f"4 KiB {op} ops/s per client",
                        "throughput",
                        "ops/s",
                        value=n / ow / threads,
                        base_name=f"redis {'SET' if op == 'put' else 'GET'} 4 KiB ops/s per client",
                        base_value=n / bw / threads,
                        higher_is_better=True,
                        target=None,
                        limit={"op": ">=", "value": 5000.0},
                        params={**params, "value_bytes": 4 * KiB},
                    )
                )
            for i in range(sizes.small_ops * threads):
                client.remove(f"s{i}")

            # -- 1 MiB put and get: GB/s --------------------------------------------------
            for i in range(64):
                client.put(f"b{i}", big, overwrite=True)
                red.set(f"b{i}", big)
            for op in ("put", "get"):
                say(f"1 MiB {op} x {sizes.big_ops}")
                ours, base = _big_ops(client, red, op, big)
                (ol, ow), (bl, bw) = _race(ours, base, sizes.big_ops, 1)
                results.append(
                    _result(
                        f"1 MiB {op}",
                        "throughput",
                        "GB/s",
                        value=sizes.big_ops * MiB / ow / 1e9,
                        base_name=f"redis {'SET' if op == 'put' else 'GET'} 1 MiB",
                        base_value=sizes.big_ops * MiB / bw / 1e9,
                        higher_is_better=True,
                        target=3.0,
                        params={
                            "value_bytes": MiB,
                            # Informational: a few slow ops move a throughput of 200 ops.
                            **_spread("", ol),
                            **_spread("baseline_", bl),
                        },
                    )
                )

            # -- batch get 64 x 1 MiB zero-copy vs the transfer engine on the same path ----
            say(f"batch get 64 x 1 MiB x {sizes.batch_reps}")
            keys = [f"b{i}" for i in range(64)]
            for key in keys:
                client.put(key, big, overwrite=True)
            dest = np.empty(64 * MiB, dtype=np.uint8)
            views = [dest[i * MiB : (i + 1) * MiB] for i in range(64)]
            client.get_into_batch(keys, views).raise_for_errors()
            locs = client._locate(keys, time.monotonic() + 30)  # the replicas the store read
            requests = [
                TransferRequest(
                    Op.READ, "bench-dest", i * MiB, loc.replicas[0][1], loc.replicas[0][2], MiB
                )
                for i, loc in enumerate(locs)
                if not isinstance(loc, StoreError)
            ]
            engine_dest = np.empty(64 * MiB, dtype=np.uint8)
            with Engine(EngineConfig(metadata_url=client.metadata_url)) as engine:
                engine.register("bench-dest", engine_dest)
                engine.transfer(requests)

                unverified = StoreClient(ClientConfig(master=address, verify_checksums=False))
                try:
                    for name, reader, target in (
                        ("batch get_into 64 x 1 MiB", client, 0.5),
                        # Informational: what the end-to-end checksum costs on this path.
                        ("batch get_into 64 x 1 MiB, checksums not verified", unverified, None),
                    ):

                        def ours_batch(_: int, reader: StoreClient = reader) -> None:
                            reader.get_into_batch(keys, views).raise_for_errors()

                        def engine_batch(_: int) -> None:
                            engine.transfer(requests)

                        ours_batch(0)  # warm: the reader's connections and mappings
                        # Batch by batch: with 20 reps, rounds of ROUND would not interleave.
                        (_, ow), (_, bw) = _race(
                            ours_batch, engine_batch, sizes.batch_reps, 1, round_ops=1
                        )
                        results.append(
                            _result(
                                name,
                                "throughput",
                                "GB/s",
                                value=sizes.batch_reps * 64 * MiB / ow / 1e9,
                                base_name="transfer engine batch READ 64 x 1 MiB (same segments)",
                                base_value=sizes.batch_reps * 64 * MiB / bw / 1e9,
                                higher_is_better=True,
                                target=target,
                                params={"items": 64, "item_bytes": MiB},
                            )
                        )
                finally:
                    unverified.close()
        finally:
            client.close()

    # -- master allocator: allocations per second, in-process ------------------------------
    say(f"allocator x {sizes.alloc_ops}")
    capacity = 1 << 30
    ours_rate = _alloc_rate(lambda: SegmentAllocator(capacity), sizes.alloc_ops)
    base_rate = _alloc_rate(lambda: _FirstFit(capacity), sizes.alloc_ops)
    results.append(
        _result(
            "master allocator allocations/s",
            "throughput",
            "allocs/s",
            value=ours_rate,
            base_name="first-fit sorted free list (bisect)",
            base_value=base_rate,
            higher_is_better=True,
            target=None,
            limit={"op": ">=", "value": 100_000.0},
            params={"capacity_bytes": capacity, "population": 2000},
        )
    )
    return _document(results)


def _document(results: list[dict[str, Any]]) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit: str | None = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "schema": "kvstack-bench/1",
        "suite": "store",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "machine": {"cpu_model": cpu_model, "cpu_count": os.cpu_count() or 1, "gpu": None},
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "redis-py": redis.__version__,
        },
        "results": results,
    }


def format_table(document: dict[str, Any]) -> str:
    """The results as an aligned text table (ours, baseline, ratio, target, verdict)."""
    rows = [("case", "ours", "baseline", "unit", "ratio", "target", "meets")]
    for r in document["results"]:
        checks: list[bool] = []
        if r["target"] is not None:
            checks.append(r["ratio"] >= r["target"])
        limit = r.get("limit")
        if limit:
            checks.append(
                r["value"] >= limit["value"]
                if limit["op"] == ">="
                else r["value"] <= limit["value"]
            )
        verdict = "-" if not checks else ("yes" if all(checks) else "NO")
        target = f"{r['target']:.2f}" if r["target"] is not None else ""
        if limit:
            target += f" {limit['op']}{limit['value']:g}"
        rows.append(
            (
                r["name"],
                f"{r['value']:.4g}",
                f"{r['baseline']['value']:.4g}",
                r["unit"],
                f"{r['ratio']:.2f}",
                target.strip(),
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )
