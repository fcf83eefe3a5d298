"""Prometheus metrics of one server: latency histograms, queue and KV gauges, prefix counters.

Each server owns its registry (tests start several in one process). Hit rate comes from counters
(``prefix_cache_hit_tokens_total / prefix_cache_query_tokens_total``); the gauge is a convenience.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvstack.serve._engine import EngineStats
from kvstack.serve._store_cache import StoreCacheStats

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


class ServeMetrics:
    """The ``kvstack_serve_*`` series; updated from the engine thread and the API."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model"]
        r = self.registry
        self._ttft = Histogram(
            "kvstack_serve_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            labels,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        ).labels(model_name)
        self._itl = Histogram(
            "kvstack_serve_inter_token_latency_seconds",
            "Time between successive tokens of one request",
            labels,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        ).labels(model_name)
        self._e2e = Histogram(
            "kvstack_serve_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            labels,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        ).labels(model_name)
        self._running = Gauge(
            "kvstack_serve_num_requests_running",
            "Requests in the running batch",
            labels,
            registry=r,
        ).labels(model_name)
        self._waiting = Gauge(
            "kvstack_serve_num_requests_waiting", "Requests queued", labels, registry=r
        ).labels(model_name)
        self._kv_usage = Gauge(
            "kvstack_serve_kv_cache_usage_ratio",
            "Fraction of KV blocks held by requests (0..1)",
            labels,
            registry=r,
        ).labels(model_name)
        self._hit_rate = Gauge(
            "kvstack_serve_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens, since start",
            labels,
            registry=r,
        ).labels(model_name)
        self._queries = Counter(
            "kvstack_serve_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache",
            labels,
            registry=r,
        ).labels(model_name)
        self._hits = Counter(
            "kvstack_serve_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache",
            labels,
            registry=r,
        ).labels(model_name)
        self._preemptions = Counter(
            "kvstack_serve_preemptions",
            "Requests preempted for lack of KV blocks",
            labels,
            registry=r,
        ).labels(model_name)
        self.requests = Counter(
            "kvstack_serve_requests",
            "Finished requests by finish reason",
            ["model", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvstack_serve_prompt_tokens", "Prompt tokens of finished requests", labels, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "kvstack_serve_generation_tokens", "Generated tokens", labels, registry=r
        ).labels(model_name)
        self._cached = Counter(
            "kvstack_serve_cached_tokens",
            "Prompt tokens not computed, by where their KV came from (local cache, store)",
            ["model", "tier"],
            registry=r,
        )
        self._store_bytes = Counter(
            "kvstack_serve_store_bytes",
            "KV bytes read from and written to the store (global prefix reuse)",
            ["model", "direction"],
            registry=r,
        )
        self._store_blocks = Counter(
            "kvstack_serve_store_blocks",
            "KV blocks read from and written to the store (global prefix reuse)",
            ["model", "direction"],
            registry=r,
        )
        self._handoffs = Gauge(
            "kvstack_serve_num_requests_transferring",
            "Decode side: requests whose prompt KV a prefill worker is writing",
            labels,
            registry=r,
        ).labels(model_name)
        self.model_name = model_name
        self._seen_store_hits = 0
        self._seen_hits_local = 0
        self._seen_store_bytes = (0, 0)
        self._seen_blocks = (0, 0)
        self._store_lock = threading.Lock()
        self._seen_queries = 0
        self._seen_hits = 0
        self._seen_preemptions = 0

    def observe_token(self, *, first: bool, seconds: float) -> None:
        """A token was produced ``seconds`` after arrival (first) or after the previous token."""
        (self._ttft if first else self._itl).observe(seconds)
        self.generation_tokens.inc()

    def observe_finished(self, *, reason: str, prompt_tokens: int, e2e_s: float) -> None:
        """A request ended."""
        self.requests.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self._e2e.observe(e2e_s)

    def observe_aborted(self) -> None:
        """A request was dropped before it finished (client gone, deadline, shutdown)."""
        self.requests.labels(self.model_name, "abort").inc()

    def update(self, stats: EngineStats) -> None:
        """Copy engine state into the gauges and advance the counters."""
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv_usage.set(stats.kv.usage)
        self._queries.inc(stats.kv.prefix_query_tokens - self._seen_queries)
        self._hits.inc(stats.kv.prefix_hit_tokens - self._seen_hits)
        self._preemptions.inc(stats.num_preemptions - self._seen_preemptions)
        self._seen_queries = stats.kv.prefix_query_tokens
        self._seen_hits = stats.kv.prefix_hit_tokens
        self._seen_preemptions = stats.num_preemptions
        self._handoffs.set(stats.num_transferring)
        self._cached.labels(self.model_name, "local").inc(
            stats.kv.prefix_hit_tokens - self._seen_hits_local
        )
        self._seen_hits_local = stats.kv.prefix_hit_tokens
        self._cached.labels(self.model_name, "store").inc(
            stats.store_hit_tokens - self._seen_store_hits
        )
        self._seen_store_hits = stats.store_hit_tokens
        if stats.store is not None:
            self.update_store(stats.store)
        if stats.kv.prefix_query_tokens:
            hits = stats.kv.prefix_hit_tokens + stats.store_hit_tokens
            self._hit_rate.set(hits / stats.kv.prefix_query_tokens)

    def update_store(self, stats: StoreCacheStats) -> None:
        """Advance the store counters (from the engine thread, or /metrics: the write-back
        runs on its own thread and finishes while the engine idles)."""
        with self._store_lock:
            read, written = stats.bytes_read, stats.bytes_written
            self._store_bytes.labels(self.model_name, "read").inc(read - self._seen_store_bytes[0])
            self._store_bytes.labels(self.model_name, "written").inc(
                written - self._seen_store_bytes[1]
            )
            self._seen_store_bytes = (read, written)
            loaded, saved = stats.loaded_blocks, stats.saved_blocks
            self._store_blocks.labels(self.model_name, "read").inc(loaded - self._seen_blocks[0])
            self._store_blocks.labels(self.model_name, "written").inc(saved - self._seen_blocks[1])
            self._seen_blocks = (loaded, saved)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
