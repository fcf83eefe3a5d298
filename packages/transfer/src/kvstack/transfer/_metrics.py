"""Prometheus metrics of the transfer engine: one set per process, by transport and peer."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server

__all__ = [
    "BYTES",
    "ERRORS",
    "LATENCY",
    "REQUESTS",
    "SERVED_BYTES",
    "SERVED_READ",
    "SERVED_WRITE",
    "record_done",
    "record_error",
    "start_exporter",
]

logger = logging.getLogger(__name__)

BYTES = Counter(
    "kvstack_transfer_bytes", "Bytes moved by completed requests", ["transport", "peer", "op"]
)
REQUESTS = Counter("kvstack_transfer_requests", "Completed requests", ["transport", "peer", "op"])
ERRORS = Counter(
    "kvstack_transfer_errors", "Failed requests by error type", ["transport", "peer", "error"]
)
LATENCY = Histogram(
    "kvstack_transfer_batch_seconds",
    "Latency from submit to completion of a batch's requests, per transport and peer",
    ["transport", "peer"],
    # 4 KiB over shm is ~10 us, 1 GiB over tcp seconds: cover both ends.
    buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0),
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


# labels() costs a lock and a tuple build per call: keep the children of hot label sets.
_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}


def record_done(
    transport: str, peer: str, op: str, *, count: int, length: int, seconds: float
) -> None:
    """``count`` requests moving ``length`` bytes finished, their batch ``seconds`` after submit."""
    key = (transport, peer, op)
    children = _children.get(key)
    if children is None:
        children = (
            BYTES.labels(transport, peer, op),
            REQUESTS.labels(transport, peer, op),
            LATENCY.labels(transport, peer),
        )
        _children[key] = children
    children[0].inc(length)
    children[1].inc(count)
    children[2].observe(seconds)


def record_error(transport: str, peer: str, error: str) -> None:
    ERRORS.labels(transport, peer, error).inc()
