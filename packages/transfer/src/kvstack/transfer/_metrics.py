"""Prometheus metrics of the transfer engine: one set per process, by transport and peer."""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = [
    "ERRORS",
    "SERVED_BYTES",
    "SERVED_READ",
    "SERVED_WRITE",
    "record_done",
    "record_error",
    "start_exporter",
]

logger = logging.getLogger(__name__)

ERRORS = Counter(
    "kvstack_transfer_errors", "Failed requests by error type", ["transport", "peer", "error"]
)
SERVED_BYTES = Counter("kvstack_transfer_served_bytes", "Bytes served to peers over tcp", ["op"])
# Children resolved once: the tcp server counts every request it serves.
SERVED_READ = SERVED_BYTES.labels("read")
SERVED_WRITE = SERVED_BYTES.labels("write")

_exporters: dict[int, int] = {}
_lock = threading.Lock()


def start_exporter(port: int, *, host: str = "127.0.0.1") -> int:
    """Serve /metrics on host:port (once per port per process); returns the bound port."""
    with _lock:
        if port in _exporters:
            return _exporters[port]
        server, _thread = start_http_server(port, addr=host)
        bound = server.server_port
        _exporters[port] = bound
        logger.info("prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound


# Latency buckets of a batch: 4 KiB over shm is ~10 us, 1 GiB over tcp seconds: cover both ends.
_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
# Records wait in a queue for the next scrape, drained sooner once this many wait.
_QUEUE_MAX = 4096


class _Completed:
    """Bytes, requests and batch latency of completed requests, per transport, peer and op,
    as a Prometheus collector (kvstack_transfer_bytes, _requests, _batch_seconds).

    A batch appends one record to ``queue`` (``record_done``: a deque append, no lock); a
    scrape (or a long queue) adds them up. Issue #3: right after a 64 MiB copy, updating two
    Counters and a Histogram took 9-20 us of a 4 MiB page batch's ~140 (H100 machine), each
    update a lock and several Python calls run cold.
    """

    def __init__(self) -> None:
        self.queue: deque[tuple[str, str, str, int, int, float]] = deque()
        self._lock = threading.Lock()  # guards the sums below
        self._counts: dict[tuple[str, str, str], list[int]] = {}  # [requests, bytes]
        # (transport, peer) -> per-bucket counts (the last: above every bound), [sum]
        self._latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def drain(self) -> None:
        with self._lock:
            queue = self.queue
            while queue:
                try:
                    transport, peer, op, count, length, seconds = queue.popleft()
                except IndexError:  # another thread took the last one
                    break
                counts = self._counts.setdefault((transport, peer, op), [0, 0])
                counts[0] += count
                counts[1] += length
                buckets, total = self._latency.setdefault(
                    (transport, peer), ([0] * (len(_BUCKETS) + 1), [0.0])
                )
                buckets[bisect.bisect_left(_BUCKETS, seconds)] += 1
                total[0] += seconds

    def collect(self) -> Iterator[Metric]:
        self.drain()
        with self._lock:
            counts = {key: list(value) for key, value in self._counts.items()}
            latency = {key: (list(b), t[0]) for key, (b, t) in self._latency.items()}
        labels = ["transport", "peer", "op"]
        moved = CounterMetricFamily(
            "kvstack_transfer_bytes", "Bytes moved by completed requests", labels=labels
        )
        done = CounterMetricFamily("kvstack_transfer_requests", "Completed requests", labels=labels)
        for key, (requests, length) in counts.items():
            moved.add_metric(list(key), length)
            done.add_metric(list(key), requests)
        seconds = HistogramMetricFamily(
            "kvstack_transfer_batch_seconds",
            "Latency from submit to completion of a batch's requests, per transport and peer",
            labels=["transport", "peer"],
        )
        for key, (buckets, total) in latency.items():
            cumulative = list(itertools.accumulate(buckets))
            bounds = [*(floatToGoString(b) for b in _BUCKETS), "+Inf"]
            seconds.add_metric(list(key), list(zip(bounds, cumulative, strict=True)), total)
        yield moved
        yield done
        yield seconds


_COMPLETED = _Completed()
REGISTRY.register(_COMPLETED)


def record_done(
    transport: str, peer: str, op: str, *, count: int, length: int, seconds: float
) -> None:
    """``count`` requests moving ``length`` bytes finished, their batch ``seconds`` after submit."""
    queue = _COMPLETED.queue
    queue.append((transport, peer, op, count, length, seconds))
    if len(queue) > _QUEUE_MAX:
        _COMPLETED.drain()


def record_error(transport: str, peer: str, error: str) -> None:
    ERRORS.labels(transport, peer, error).inc()
