"""The router: an OpenAI-compatible front door that forwards each request to one of N workers.

Workers are ``kvstack-serve up`` servers. The router reads the request body, picks a worker with
its policy (see ``_policy.py``), and relays the worker's answer byte for byte, SSE included.

Failure handling, in order:

- A worker that refuses the connection, resets it, answers 500/502/503 or sends nothing before
  the first byte of its body counts as a failure of that worker; the request is retried on
  another worker after a backoff, at most ``max_retries`` times.
- Nothing reaches the client before the worker's first body chunk is in hand, so every retry
  happens before the client's first byte; after it, a failure is never retried and never hidden:
  an SSE stream gets an OpenAI error event and the connection is cut without ``[DONE]``. A JSON
  answer is read whole first; if the worker fails midway the client gets a 502, not a retry
  (the worker already ran the request).
- Each worker has a circuit breaker: ``breaker_failure_threshold`` consecutive failures open it
  (no traffic) for ``breaker_cooldown_s``; then one trial request (half-open) closes or reopens
  it. A health probe of ``/health`` every ``health_check_interval_s`` feeds the same breaker.
- Every request has a deadline (``request_timeout_s``), first byte and stream alike.
- ``x-kvstack-trace-id`` (the client's, or a new one) goes to the worker and back to the client,
  with ``x-kvstack-worker`` naming the worker that answered.

PD mode (``prefill_workers`` and ``decode_workers``): the policy picks the prefill worker (where
prefix caches live), the least-loaded decode worker gets the request with the prefill worker's
URL in ``x-kvstack-prefill``, and runs the handoff (``_disagg.py``) before its first byte. A
``kv_handoff_failed`` answer counts against the prefill worker; the pair is retried like any
failure before the first byte. The decode worker's ``x-kvstack-timings`` feed the per-phase
histograms.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvstack.serve._disagg import PREFILL_HEADER, TIMINGS_HEADER, HandoffTimings
from kvstack.serve._policy import (
    CacheAwarePolicy,
    PolicyName,
    RoutingPolicy,
    WorkerLoad,
    make_policy,
    routing_key,
)
from kvstack.serve._protocol import error_body
from kvstack.serve._server import bind_socket
from kvstack.serve.errors import (
    ConfigError,
    NoWorkerAvailable,
    RequestTimeout,
    ServeError,
    UpstreamError,
)

__all__ = ["TRACE_HEADER", "WORKER_HEADER", "BreakerState", "Router", "RouterConfig", "run_router"]

logger = logging.getLogger(__name__)

TRACE_HEADER = "x-kvstack-trace-id"
WORKER_HEADER = "x-kvstack-worker"
# Statuses that mean "this worker cannot serve now", not "this request is bad": retried elsewhere.
# 504 is not among them: the worker's own deadline ran out, and another worker would take as long.
_RETRYABLE_STATUSES = frozenset({500, 502, 503})
_HANDOFF_FAILED = "kv_handoff_failed"  # the error code of a decode worker's failed handoff
# Response headers relayed from the worker; hop-by-hop ones are the router's own business.
_RELAYED_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "cache-control",
    TIMINGS_HEADER,
)
_ROUTING_BUCKETS_S = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
_PHASE_BUCKETS_S = (
    1e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
_BYTES_BUCKETS = tuple(float(4**k * 4096) for k in range(12))  # 4 KiB .. 16 GiB
_REQUEST_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _check_positive(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(field, value, "must be positive")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The router: its workers, policy, retries, breaker, health checks and deadlines (seconds)."""

    workers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    policy: str = PolicyName.CACHE_AWARE.value
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    tree_block_len: int = 16
    max_tree_nodes: int = 65536
    max_retries: int = 2
    retry_backoff_s: float = 0.05
    retry_max_backoff_s: float = 1.0
    breaker_failure_threshold: int = 3
    breaker_cooldown_s: float = 10.0
    health_check_interval_s: float = 5.0
    health_check_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    seed: int | None = None
    # PD mode: both lists non-empty (``workers`` then stays empty).
    prefill_workers: tuple[str, ...] = ()
    decode_workers: tuple[str, ...] = ()

    @property
    def pd(self) -> bool:
        """True in prefill/decode mode."""
        return bool(self.prefill_workers)

    @property
    def all_workers(self) -> tuple[str, ...]:
        """Every worker URL, colocated or prefill then decode."""
        return (*self.workers, *self.prefill_workers, *self.decode_workers)

    def __post_init__(self) -> None:
        if bool(self.prefill_workers) != bool(self.decode_workers):
            raise ConfigError(
                "prefill_workers", self.prefill_workers, "PD mode needs prefill and decode workers"
            )
        if self.pd and self.workers:
            raise ConfigError("workers", self.workers, "PD mode takes no colocated workers")
        if not self.all_workers:
            raise ConfigError("workers", self.workers, "needs at least one worker URL")
        for url in self.all_workers:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError("workers", url, "each worker must be an http(s):// URL")
        if len(set(self.all_workers)) != len(self.all_workers):
            raise ConfigError("workers", self.all_workers, "lists a worker twice")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError("port", self.port, "must be in 0..65535 (0 picks a free port)")
        if self.policy not in {p.value for p in PolicyName}:
            choices = ", ".join(p.value for p in PolicyName)
            raise ConfigError("policy", self.policy, f"must be one of {choices}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError("cache_threshold", self.cache_threshold, "must be in [0, 1]")
        if not isinstance(self.balance_abs_threshold, int) or self.balance_abs_threshold < 0:
            raise ConfigError(
                "balance_abs_threshold", self.balance_abs_threshold, "must be an integer >= 0"
            )
        if not self.balance_rel_threshold >= 1.0:
            raise ConfigError("balance_rel_threshold", self.balance_rel_threshold, "must be >= 1")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError("max_retries", self.max_retries, "must be an integer >= 0")
        for name in ("tree_block_len", "max_tree_nodes", "breaker_failure_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, value, "must be a positive integer")
        if self.retry_backoff_s < 0:
            raise ConfigError("retry_backoff_s", self.retry_backoff_s, "must be >= 0")
        if self.retry_max_backoff_s < self.retry_backoff_s:
            raise ConfigError(
                "retry_max_backoff_s", self.retry_max_backoff_s, "must be >= retry_backoff_s"
            )
        _check_positive("breaker_cooldown_s", self.breaker_cooldown_s)
        _check_positive("health_check_interval_s", self.health_check_interval_s)
        _check_positive("health_check_timeout_s", self.health_check_timeout_s)
        _check_positive("connect_timeout_s", self.connect_timeout_s)
        _check_positive("request_timeout_s", self.request_timeout_s)


class BreakerState(StrEnum):
    """A worker's circuit breaker: closed (in use), open (skipped), half-open (one trial)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class _Breaker:
    """Consecutive failures open it; after the cooldown one trial request closes or reopens it."""

    def __init__(self, *, failure_threshold: int, cooldown_s: float) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    def available(self, now: float) -> bool:
        """Whether a request may go there now (no state change)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now - self._opened_at >= self.cooldown_s
        return not self._trial_in_flight

    def on_dispatch(self) -> None:
        """A request goes there: past an open breaker's cooldown, it is the half-open trial."""
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.HALF_OPEN
            self._trial_in_flight = True

    def on_probe_success(self) -> None:
        """The health probe answered: an open breaker lets one trial through."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            self._trial_in_flight = False

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._trial_in_flight = False

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self._trial_in_flight = False
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = BreakerState.OPEN
            self._opened_at = now


# ---- the connections to the workers ---------------------------------------------------------
#
# A small HTTP/1.1 client of our own (asyncio protocol, httptools parser) instead of httpx2: per
# request httpx2 spent ~1 ms of router CPU on the 2-core box (URL and header models, h11, anyio,
# the pool's bookkeeping), about 70% of the router's whole cost and most of its added latency
# (issue 7, benchmark 4; profiled with cProfile on process time, measured with bench_router.py).

_IDLE_EXPIRY_S = 4.0  # under uvicorn's 5 s keep-alive timeout: we drop an idle connection first
_MAX_IDLE_PER_WORKER = 256
_HIGH_WATER_BYTES = 1 << 16  # unread body bytes at which a connection stops reading
_UNSAFE_HEADER_VALUE = re.compile(r"[\r\n\0]")


class _WireError(Exception):
    """A connection to a worker failed: not made, closed or reset early, or a malformed answer."""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a worker, one exchange at a time.

    An exchange that fails or is abandoned before its last byte closes the connection, so a
    half-read answer is never mistaken for the next one. Errors name no peer: the caller wraps
    them in an UpstreamError that names the worker."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.complete = False
        self._parser = httptools.HttpResponseParser(self)
        self._busy = False
        self._headers_done = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: _WireError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets it too; said here because Nagle plus the worker's delayed ACK costs
            # ~40 ms a request on a reused connection (see _server.bind_socket).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            self._fail(f"{len(data)} bytes arrived on an idle connection")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed answer: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._error is None and self._busy and not self.complete:
            how = f"reset ({exc!r})" if exc is not None else "closed by the worker"
            stage = "after the headers" if self._headers_done else "before an answer"
            self._error = _WireError(f"connection {how} {stage}")
        self._wake()

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if body:
            self._chunks.append(body)
            self._buffered += len(body)
            if self._buffered > _HIGH_WATER_BYTES and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- one exchange

    @property
    def drained(self) -> bool:
        """Whether the whole answer is in and every chunk of it was read."""
        return self.complete and not self._chunks

    async def start(self, request: bytes) -> None:
        """Send ``request`` (whole) and wait for the answer's status and headers."""
        if self.transport is None or self.closed:
            raise _WireError("connection closed")
        self._busy, self._headers_done, self.complete = True, False, False
        self.status = 0
        self.headers = {}
        self.transport.write(request)
        while not self._headers_done:
            await self._wait()

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` once the answer is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _HIGH_WATER_BYTES // 4 and self.transport:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def finish(self, now: float) -> bool:
        """End the exchange; whether the connection can take another (else it is closed)."""
        reusable = self.drained and self.keep_alive and not self.closed and self._error is None
        self._busy = False
        if reusable:
            self.idle_since = now
        else:
            self.close()
        return reusable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise _WireError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = _WireError(reason)
        self.close()
        self._wake()


class _Answer:
    """A worker's answer: status and headers in hand, the body read chunk by chunk; ``close()``
    hands the connection back to its worker's pool (or closes it if the body was not read)."""

    __slots__ = ("_conn", "_worker", "headers", "status_code")

    def __init__(self, conn: _Connection, worker: _Worker) -> None:
        self._conn = conn
        self._worker = worker
        self.status_code = conn.status
        self.headers = conn.headers

    @property
    def drained(self) -> bool:
        """Whether the whole body is in and was read."""
        return self._conn.drained

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` at the end; _WireError if the connection fails."""
        return await self._conn.read()

    async def aread(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := await self._conn.read():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        conn, idle = self._conn, self._worker.idle
        if conn.finish(time.monotonic()) and len(idle) < _MAX_IDLE_PER_WORKER:
            idle.append(conn)
        elif not conn.closed:
            conn.close()


class _Worker:
    def __init__(self, url: str, index: int, breaker: _Breaker, metrics: RouterMetrics) -> None:
        self.url = url
        self.index = index
        self.breaker = breaker
        self.in_flight = 0
        self.in_flight_gauge = metrics.in_flight.labels(url)
        self.breaker_gauge = metrics.breaker_state.labels(url)
        parts = urlsplit(self.url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.path_prefix = parts.path
        self.idle: list[_Connection] = []  # keep-alive connections, the most recent last


class RouterMetrics:
    """The ``kvstack_router_*`` series, in a registry of their own."""

    def __init__(self, workers: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "kvstack_router_requests",
            "Requests answered, by the worker that answered (or 'none') and HTTP status",
            ["worker", "status"],
            registry=r,
        )
        self.retries = Counter(
            "kvstack_router_retries",
            "Attempts retried on another worker, by the worker that failed",
            ["worker"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "kvstack_router_upstream_failures",
            "Worker failures (refused, reset, 5xx, cut mid-stream, failed health probes)",
            ["worker"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "kvstack_router_breaker_state",
            "Circuit breaker per worker: 0 closed, 1 half-open, 2 open",
            ["worker"],
            registry=r,
        )
        self.in_flight = Gauge(
            "kvstack_router_requests_in_flight",
            "Requests the router has on each worker now",
            ["worker"],
            registry=r,
        )
        self.decisions = Counter(
            "kvstack_router_cache_aware_decisions",
            "cache_aware choices: hit (affinity), miss (least loaded), imbalanced (least loaded)",
            ["outcome"],
            registry=r,
        )
        self.routing = Histogram(
            "kvstack_router_routing_seconds",
            "Time to pick a worker (policy and candidate filtering)",
            buckets=_ROUTING_BUCKETS_S,
            registry=r,
        )
        self.duration = Histogram(
            "kvstack_router_request_duration_seconds",
            "Time from arrival to the last byte relayed",
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.phase = Histogram(
            "kvstack_router_phase_seconds",
            "Per-request phases: queue (router arrival to dispatch), alloc_wait, handshake, "
            "prefill, kv_transfer (PD handoff, from the decode worker), first_token (arrival to "
            "the first byte), decode (first byte to the last)",
            ["phase"],
            buckets=_PHASE_BUCKETS_S,
            registry=r,
        )
        self.kv_transfer_bytes = Histogram(
            "kvstack_router_kv_transfer_bytes",
            "KV bytes pushed from the prefill to the decode worker per request",
            buckets=_BYTES_BUCKETS,
            registry=r,
        )
        for url in workers:
            self.breaker_state.labels(url).set(0)
            self.in_flight.labels(url).set(0)
        # Children looked up once: labels() takes a lock and hashes the labels on every call.
        self.phase_queue = self.phase.labels("queue")
        self.phase_first_token = self.phase.labels("first_token")
        self.phase_decode = self.phase.labels("decode")
        self._requests: dict[tuple[str, str], Counter] = {}
        self._decisions: dict[str, Counter] = {}

    def count_request(self, worker: str, status: str) -> None:
        """One answered request, by the worker that answered (or 'none') and its status."""
        child = self._requests.get((worker, status))
        if child is None:
            child = self._requests[worker, status] = self.requests.labels(worker, status)
        child.inc()

    def count_decision(self, outcome: str) -> None:
        """One cache_aware choice: hit, miss or imbalanced."""
        child = self._decisions.get(outcome)
        if child is None:
            child = self._decisions[outcome] = self.decisions.labels(outcome)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class _Upstream:
    worker: _Worker
    response: _Answer
    first: bytes
    first_byte_s: float = 0.0  # perf_counter when the first body chunk was in hand


def _error_response(exc: ServeError, trace_id: str) -> JSONResponse:
    if isinstance(exc, RequestTimeout):
        status, code = 504, "timeout"
    elif isinstance(exc, NoWorkerAvailable):
        status, code = 503, "no_worker_available"
    else:
        status, code = 502, "upstream_error"
    body = error_body(str(exc), kind="server_error", param=None, code=code)
    return JSONResponse(body, status_code=status, headers={TRACE_HEADER: trace_id})


class Router:
    """Worker state, the policy and the forwarding logic; ``app`` is its ASGI application."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        on_ready: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        self.config = config
        self._on_ready = on_ready
        urls = [url.rstrip("/") for url in config.all_workers]
        self.metrics = RouterMetrics(urls)
        self.workers = [
            _Worker(
                url,
                i,
                _Breaker(
                    failure_threshold=config.breaker_failure_threshold,
                    cooldown_s=config.breaker_cooldown_s,
                ),
                self.metrics,
            )
            for i, url in enumerate(urls)
        ]
        # Colocated mode: every worker takes requests. PD mode: the policy picks among the
        # prefill workers, and decode workers are picked by load.
        decode_urls = set(config.decode_workers)
        self.entry_workers = [w for w in self.workers if w.url not in decode_urls]
        self.decode_workers = [w for w in self.workers if w.url in decode_urls]
        self.policy: RoutingPolicy = make_policy(
            config.policy,
            cache_threshold=config.cache_threshold,
            balance_abs_threshold=config.balance_abs_threshold,
            balance_rel_threshold=config.balance_rel_threshold,
            block_len=config.tree_block_len,
            max_nodes_per_tenant=config.max_tree_nodes,
            seed=config.seed,
        )
        self._tls: ssl.SSLContext | None = None
        self._started = False
        self._health_task: asyncio.Task[None] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    # ---- lifecycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncGenerator[None]:
        await self.start()
        try:
            if self._on_ready is not None:
                result = self._on_ready()
                if result is not None:
                    await result
            yield
        finally:
            await self.close()

    async def start(self) -> None:
        """Start the health loop (connections to the workers open on demand)."""
        if self._started:
            return
        self._started = True
        self._health_task = asyncio.create_task(self._health_loop(), name="kvstack-router-health")

    async def close(self) -> None:
        """Stop the health loop and close the idle connections."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for w in self.workers:
            while w.idle:
                w.idle.pop().close()
        self._started = False

    # ---- connections -----------------------------------------------------------------------

    async def _connect(self, worker: _Worker) -> _Connection:
        """An idle keep-alive connection to ``worker``, or a new one; _WireError if none."""
        now = time.monotonic()
        while worker.idle:
            conn = worker.idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_EXPIRY_S:
                return conn
            conn.close()
        if worker.tls and self._tls is None:
            self._tls = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection,
                    worker.host,
                    worker.port,
                    ssl=self._tls if worker.tls else None,
                    server_hostname=worker.host if worker.tls else None,
                )
        except TimeoutError as exc:
            raise _WireError(f"connect timed out after {self.config.connect_timeout_s} s") from exc
        except OSError as exc:
            raise _WireError(f"connect failed: {exc!r}") from exc
        return conn

    async def _send(
        self, worker: _Worker, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> _Answer:
        """Send one request to ``worker``; the answer once its status and headers are in."""
        lines = [f"{method} {worker.path_prefix}{path} HTTP/1.1\r\nhost: {worker.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        request = "".join(lines).encode("latin-1") + body
        conn = await self._connect(worker)
        try:
            await conn.start(request)
        except BaseException:
            conn.close()
            raise
        return _Answer(conn, worker)

    # ---- worker state ----------------------------------------------------------------------

    def _set_breaker_gauge(self, worker: _Worker) -> None:
        worker.breaker_gauge.set(_BREAKER_GAUGE[worker.breaker.state])

    def _fail(self, worker: _Worker, reason: str) -> None:
        before = worker.breaker.state
        worker.breaker.record_failure(time.monotonic())
        self.metrics.upstream_failures.labels(worker.url).inc()
        self._set_breaker_gauge(worker)
        if worker.breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
            logger.warning("worker %s: circuit breaker opened (%s)", worker.url, reason)

    def _succeed(self, worker: _Worker) -> None:
        if worker.breaker.state is not BreakerState.CLOSED:
            logger.info("worker %s: circuit breaker closed", worker.url)
        worker.breaker.record_success()
        self._set_breaker_gauge(worker)

    async def _probe(self, worker: _Worker) -> None:
        try:
            async with asyncio.timeout(self.config.health_check_timeout_s):
                answer = await self._send(worker, "GET", "/health", b"", {})
                try:
                    await answer.aread()
                finally:
                    answer.close()
            healthy = answer.status_code == 200
            reason = f"health probe answered {answer.status_code}"
        except TimeoutError:
            healthy = False
            reason = f"health probe timed out after {self.config.health_check_timeout_s} s"
        except _WireError as exc:
            healthy, reason = False, f"health probe failed: {exc}"
        if healthy:
            worker.breaker.on_probe_success()
            self._set_breaker_gauge(worker)
        else:
            self._fail(worker, reason)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(w) for w in self.workers))
            now = time.monotonic()
            for w in self.workers:  # close connections that sat idle past their expiry
                stale = [c for c in w.idle if c.closed or now - c.idle_since >= _IDLE_EXPIRY_S]
                for conn in stale:
                    w.idle.remove(conn)
                    conn.close()
            await asyncio.sleep(self.config.health_check_interval_s)

    def _pick(self, key: list[int], tried: set[str]) -> tuple[_Worker, _Worker | None]:
        """``(worker, None)``, or ``(decode, prefill)`` in PD mode, for the next attempt,
        preferring workers this request has not tried yet."""
        started = time.perf_counter()
        now = time.monotonic()
        available = [w for w in self.entry_workers if w.breaker.available(now)]
        if not available:
            role = "prefill " if self.config.pd else ""
            raise NoWorkerAvailable(
                len(self.entry_workers), f"every {role}worker's circuit breaker is open"
            )
        fresh = [w for w in available if w.url not in tried] or available
        loads = [WorkerLoad(w.url, w.in_flight, w.index) for w in fresh]
        chosen = self.workers[self.policy.select(loads, key).index]
        if isinstance(self.policy, CacheAwarePolicy):
            self.metrics.count_decision(self.policy.last_outcome)
        prefill: _Worker | None = None
        if self.config.pd:
            decoders = [w for w in self.decode_workers if w.breaker.available(now)]
            if not decoders:
                raise NoWorkerAvailable(
                    len(self.decode_workers), "every decode worker's circuit breaker is open"
                )
            fresh = [w for w in decoders if w.url not in tried] or decoders
            prefill, chosen = chosen, min(fresh, key=lambda w: (w.in_flight, w.index))
            prefill.breaker.on_dispatch()
            self._set_breaker_gauge(prefill)
        chosen.breaker.on_dispatch()
        self._set_breaker_gauge(chosen)
        self.metrics.routing.observe(time.perf_counter() - started)
        return chosen, prefill

    def _backoff_s(self, attempt: int) -> float:
        return min(
            self.config.retry_max_backoff_s, self.config.retry_backoff_s * 2 ** (attempt - 1)
        )

    # ---- forwarding ------------------------------------------------------------------------

    async def _open(
        self, worker: _Worker, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> _Upstream:
        """Send to ``worker`` and wait for its status and first body chunk; UpstreamError else."""
        try:
            response = await self._send(worker, method, path, body, headers)
        except _WireError as exc:
            raise UpstreamError(worker.url, str(exc)) from exc
        try:
            if response.status_code in _RETRYABLE_STATUSES:
                raw = await response.aread()
                code = ""
                with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                    code = f" {json.loads(raw)['error']['code']}"
                detail = raw[:300].decode(errors="replace")
                raise UpstreamError(worker.url, f"HTTP {response.status_code}{code}: {detail}")
            first = await response.read()
        except _WireError as exc:
            response.close()
            raise UpstreamError(worker.url, str(exc)) from exc
        except BaseException:
            response.close()
            raise
        return _Upstream(worker, response, first)

    async def _forward(self, request: Request, method: str, path: str) -> Response:
        started = time.perf_counter()
        trace_id = request.headers.get(TRACE_HEADER)
        if not trace_id or _UNSAFE_HEADER_VALUE.search(trace_id):
            trace_id = uuid.uuid4().hex
        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its body was in: nothing to forward or answer
            self.metrics.count_request("none", "499")  # nginx's "client closed request"
            return Response(status_code=499)
        key: list[int] = []
        if body:
            with contextlib.suppress(ValueError):  # a bad body goes through: the worker says why
                parsed: object = json.loads(body)
                if isinstance(parsed, dict):
                    key = routing_key(parsed)
        headers = {"content-type": "application/json", TRACE_HEADER: trace_id}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_s
        tried: set[str] = set()
        dispatched = started
        upstream: _Upstream | None = None
        error: ServeError | None = None
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in range(self.config.max_retries + 1):
                    if attempt:
                        await asyncio.sleep(self._backoff_s(attempt))
                    try:
                        picked = self._pick(key, tried)
                    except NoWorkerAvailable as exc:
                        if error is not None:  # keep the failure that opened the last breaker
                            exc = NoWorkerAvailable(exc.num_workers, f"{exc.reason}; {error}")
                        error = exc
                        break
                    worker, prefill = picked
                    attempt_headers = headers
                    tried.add(worker.url)
                    if prefill is not None:
                        tried.add(prefill.url)
                        attempt_headers = {**headers, PREFILL_HEADER: prefill.url}
                    self._hold(worker, prefill)
                    dispatched = time.perf_counter()
                    try:
                        upstream = await self._open(worker, method, path, body, attempt_headers)
                    except UpstreamError as exc:
                        self._release(worker, prefill)
                        # A failed handoff is the prefill worker's failure (its death, its 5xx).
                        blamed = (
                            prefill
                            if prefill is not None and _HANDOFF_FAILED in exc.reason
                            else worker
                        )
                        self._fail(blamed, exc.reason)
                        error = exc
                        if attempt < self.config.max_retries:
                            self.metrics.retries.labels(blamed.url).inc()
                            logger.info("trace %s: %s; retrying", trace_id, exc)
                        continue
                    except BaseException:
                        self._release(worker, prefill)
                        raise
                    if prefill is not None:
                        # The handoff ended before the decode worker's first byte: the prefill
                        # worker's share of this request is done (its load counts no longer).
                        self._succeed(prefill)
                        self._release(prefill)
                    break
        except TimeoutError:
            if upstream is not None:  # the deadline fired just as the worker answered
                upstream.response.close()
                self._release(upstream.worker)
                upstream = None
            error = RequestTimeout(trace_id, self.config.request_timeout_s)
        if upstream is None:
            if error is None:
                error = NoWorkerAvailable(len(self.workers), "no attempt was made")
            response = _error_response(error, trace_id)
            self.metrics.count_request("none", str(response.status_code))
            self.metrics.duration.observe(time.perf_counter() - started)
            return response
        self._succeed(upstream.worker)
        self._observe_phases(upstream, started, dispatched)
        if upstream.response.headers.get("content-type", "").startswith("text/event-stream"):
            return self._relay(upstream, trace_id, deadline, started)
        return await self._whole(upstream, trace_id, deadline, started)

    def _hold(self, worker: _Worker, prefill: _Worker | None) -> None:
        for w in (worker, prefill):
            if w is not None:
                w.in_flight += 1
                w.in_flight_gauge.set(w.in_flight)

    def _release(self, worker: _Worker, prefill: _Worker | None = None) -> None:
        for w in (worker, prefill):
            if w is not None:
                w.in_flight -= 1
                w.in_flight_gauge.set(w.in_flight)

    def _observe_phases(self, upstream: _Upstream, started: float, dispatched: float) -> None:
        now = time.perf_counter()
        upstream.first_byte_s = now
        self.metrics.phase_queue.observe(dispatched - started)
        self.metrics.phase_first_token.observe(now - started)
        text = upstream.response.headers.get(TIMINGS_HEADER)
        timings = HandoffTimings.parse(text) if text else None
        if timings is not None:
            phase = self.metrics.phase
            phase.labels("alloc_wait").observe(timings.alloc_wait_s)
            phase.labels("handshake").observe(timings.handshake_s)
            phase.labels("prefill").observe(timings.prefill_s)
            phase.labels("kv_transfer").observe(timings.transfer_s)
            self.metrics.kv_transfer_bytes.observe(timings.transfer_bytes)

    def _headers(self, upstream: _Upstream, trace_id: str) -> dict[str, str]:
        headers = upstream.response.headers
        relayed = {k: headers[k] for k in _RELAYED_HEADERS if k in headers}
        relayed[TRACE_HEADER] = trace_id
        relayed[WORKER_HEADER] = upstream.worker.url
        return relayed

    async def _whole(
        self, upstream: _Upstream, trace_id: str, deadline: float, started: float
    ) -> Response:
        """A JSON answer, read whole before the client sees a byte (a plain response costs the
        router less CPU than a streamed one: measured with benchmarks/bench_router.py)."""
        worker, response = upstream.worker, upstream.response
        parts = [upstream.first]
        error: ServeError | None = None
        try:
            if not response.drained:  # else the first chunk was the whole body
                async with asyncio.timeout_at(deadline):
                    while chunk := await response.read():
                        parts.append(chunk)
        except _WireError as exc:
            error = UpstreamError(worker.url, f"cut mid-response: {exc}")
            self._fail(worker, error.reason)
        except TimeoutError:
            error = RequestTimeout(trace_id, self.config.request_timeout_s)
        finally:
            response.close()
            self._release(worker)
        now = time.perf_counter()
        self.metrics.duration.observe(now - started)
        self.metrics.phase_decode.observe(now - upstream.first_byte_s)
        if error is not None:
            # Nothing reached the client yet, but the worker did run the request: answer the
            # error rather than run it twice (a retry here would double the worker's load).
            logger.warning("trace %s: %s", trace_id, error)
            self.metrics.count_request(worker.url, "aborted")
            return _error_response(error, trace_id)
        self.metrics.count_request(worker.url, str(response.status_code))
        headers = self._headers(upstream, trace_id)
        headers.pop("content-length", None)  # Response sets it from the body
        return Response(b"".join(parts), status_code=response.status_code, headers=headers)

    def _relay(
        self, upstream: _Upstream, trace_id: str, deadline: float, started: float
    ) -> StreamingResponse:
        worker, response = upstream.worker, upstream.response
        status = response.status_code

        async def relay() -> AsyncIterator[bytes]:
            try:
                if upstream.first:
                    yield upstream.first
                try:
                    async with asyncio.timeout_at(deadline):
                        while chunk := await response.read():
                            yield chunk
                except (_WireError, TimeoutError) as exc:
                    if isinstance(exc, TimeoutError):
                        failure: ServeError = RequestTimeout(
                            trace_id, self.config.request_timeout_s
                        )
                    else:
                        failure = UpstreamError(worker.url, f"cut mid-response: {exc}")
                        self._fail(worker, failure.reason)
                    logger.warning("trace %s: %s", trace_id, failure)
                    self.metrics.count_request(worker.url, "aborted")
                    event = error_body(str(failure), kind="server_error", param=None, code=None)
                    yield f"data: {json.dumps(event)}\n\n".encode()
                    # Raising cuts the connection without a clean end of body: the client sees an
                    # error, never a truncated answer that looks complete.
                    raise failure from exc
                self.metrics.count_request(worker.url, str(status))
            finally:
                response.close()
                self._release(worker)
                now = time.perf_counter()
                self.metrics.duration.observe(now - started)
                self.metrics.phase_decode.observe(now - upstream.first_byte_s)

        return StreamingResponse(
            relay(), status_code=status, headers=self._headers(upstream, trace_id)
        )

    # ---- routes ----------------------------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        return await self._forward(request, "POST", "/v1/completions")

    async def _chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "POST", "/v1/chat/completions")

    async def _models(self, request: Request) -> Response:
        return await self._forward(request, "GET", "/v1/models")

    async def _health(self, _request: Request) -> Response:
        now = time.monotonic()
        workers = [
            {
                "url": w.url,
                "breaker": w.breaker.state.value,
                "available": w.breaker.available(now),
                "in_flight": w.in_flight,
                "role": _role(self.config, w.url),
            }
            for w in self.workers
        ]
        ok = any(w["available"] for w in workers if w["role"] != "decode") and (
            not self.config.pd or any(w["available"] for w in workers if w["role"] == "decode")
        )
        body: dict[str, Any] = {
            "status": "ok" if ok else "no worker available",
            "policy": self.policy.name,
            "workers": workers,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def _metrics(self, _request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _role(config: RouterConfig, url: str) -> str:
    if url.rstrip("/") in {u.rstrip("/") for u in config.prefill_workers}:
        return "prefill"
    if url.rstrip("/") in {u.rstrip("/") for u in config.decode_workers}:
        return "decode"
    return "colocated"


async def run_router(
    config: RouterConfig,
    *,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``config`` until ``stop`` is set, or cancelled or signalled (SIGINT/SIGTERM);
    ``on_ready(url)`` once listening."""
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    async def announce() -> None:
        # Runs at lifespan startup with the pool open, just before uvicorn accepts on the socket.
        logger.info(
            "routing at %s over %d workers (%s%s)",
            url,
            len(config.all_workers),
            config.policy,
            ", PD" if config.pd else "",
        )
        if on_ready is not None:
            result = on_ready(url)
            if result is not None:
                await result

    router = Router(config, on_ready=announce)
    server = uvicorn.Server(
        uvicorn.Config(
            router.app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            http="httptools",  # uvicorn's C parser, not h11: less CPU per request (issue 7)
        )
    )

    async def stop_when_told(event: asyncio.Event) -> None:
        await event.wait()
        server.should_exit = True  # uvicorn's own graceful exit, checked every 0.1 s

    watcher = asyncio.create_task(stop_when_told(stop)) if stop is not None else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.cancel()
        sock.close()
        logger.info("router at %s stopped", url)
