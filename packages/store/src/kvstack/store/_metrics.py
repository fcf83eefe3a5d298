"""Prometheus metrics of the master, in a registry of its own (several masters may share a
process: embedded stores, tests)."""

from __future__ import annotations

import prometheus_client as prom

__all__ = ["MasterMetrics"]

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0,
)  # fmt: skip


class MasterMetrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.objects = prom.Gauge("kvstack_store_objects", "Committed objects", registry=r)
        self.object_bytes = prom.Gauge(
            "kvstack_store_object_bytes", "Bytes of committed objects (one copy)", registry=r
        )
        self.capacity = prom.Gauge(
            "kvstack_store_capacity_bytes",
            "Capacity per segment and tier",
            ["node", "segment", "tier"],
            registry=r,
        )
        self.used = prom.Gauge(
            "kvstack_store_used_bytes",
            "Used bytes per segment and tier",
            ["node", "segment", "tier"],
            registry=r,
        )
        self.fragmentation = prom.Gauge(
            "kvstack_store_fragmentation",
            "1 - largest free block / free bytes, per segment",
            ["node", "segment"],
            registry=r,
        )
        self.nodes = prom.Gauge("kvstack_store_nodes", "Live nodes", registry=r)
        self.hits = prom.Counter("kvstack_store_hits", "Gets that found the key", registry=r)
        self.misses = prom.Counter("kvstack_store_misses", "Gets of a missing key", registry=r)
        self.evictions = prom.Counter(
            "kvstack_store_evictions", "Objects evicted from memory", ["action"], registry=r
        )
        self.promotions = prom.Counter(
            "kvstack_store_promotions", "Objects promoted from disk on read", registry=r
        )
        self.lease_waits = prom.Counter(
            "kvstack_store_lease_waits",
            "Frees deferred and eviction candidates skipped because a read lease was held",
            registry=r,
        )
        self.node_deaths = prom.Counter(
            "kvstack_store_node_deaths", "Nodes declared dead", registry=r
        )
        self.rereplications = prom.Counter(
            "kvstack_store_rereplications", "Replicas restored after a node death", registry=r
        )
        self.latency = prom.Histogram(
            "kvstack_store_op_seconds",
            "Master handling time per request",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the exporter on ``host:port`` (0 picks one); returns the port."""
        server, _thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
