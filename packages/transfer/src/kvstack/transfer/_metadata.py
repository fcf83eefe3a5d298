"""Metadata backends: where segment names are resolved to their owner (SegmentInfo).

Chosen by URL (``open_metadata``): ``http://host:port`` talks to the embedded server
(``kvstack-transfer metadata``), ``redis://host:port/db`` to a Redis server, ``memory://name``
stays inside this process. Entries carry a TTL that the owner refreshes (heartbeat), so the
segments of a dead host expire; same-host owners are also checked by pid (see _engine.py).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import ClassVar, Protocol

import redis

from kvstack.transfer._types import SegmentInfo
from kvstack.transfer.errors import ConfigError, MetadataError, SegmentExists, SegmentNotFound

__all__ = ["HttpMetadata", "MemoryMetadata", "MetadataBackend", "RedisMetadata", "open_metadata"]

API_PREFIX = "/v1/segments"


class MetadataBackend(Protocol):
    """Maps segment names to SegmentInfo. Implementations must be thread-safe."""

    url: str

    def get(self, name: str) -> SegmentInfo:
        """The live record of ``name``; raises SegmentNotFound."""
        ...

    def put(self, info: SegmentInfo, *, ttl_s: float, replace: bool = False) -> None:
        """Store or refresh ``info`` for ttl_s seconds.

        Raises SegmentExists if another owner holds the name, unless ``replace``.
        """
        ...

    def delete(self, name: str, *, owner: str) -> None:
        """Remove ``name`` if ``owner`` still holds it; a no-op otherwise."""
        ...

    def names(self) -> list[str]:
        """Names of all live segments."""
        ...

    def watch(self, name: str, *, timeout_s: float) -> SegmentInfo:
        """Wait until ``name`` is registered; raises SegmentNotFound after timeout_s."""
        ...

    def close(self) -> None: ...


def poll_until_registered(backend: MetadataBackend, name: str, *, timeout_s: float) -> SegmentInfo:
    """``watch`` by polling ``get`` with backoff (1 ms doubling to 100 ms) up to the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            return backend.get(name)
        except SegmentNotFound:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.1)


class MemoryMetadata:
    """In-process metadata: engines of one process that open the same ``memory://name`` share it."""

    _stores: ClassVar[dict[str, dict[str, tuple[SegmentInfo, float]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        self.url = url
        with self._lock:
            self._entries = self._stores.setdefault(url, {})

    def get(self, name: str) -> SegmentInfo:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry[1] < time.monotonic():
                self._entries.pop(name, None)
                raise SegmentNotFound(name)
            return entry[0]

    def put(self, info: SegmentInfo, *, ttl_s: float, replace: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            old = self._entries.get(info.name)
            if old is not None and old[1] >= now and old[0].owner != info.owner and not replace:
                raise SegmentExists(info.name)
            self._entries[info.name] = (info, now + ttl_s)

    def delete(self, name: str, *, owner: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry[0].owner == owner:
                del self._entries[name]

    def names(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return sorted(n for n, (_, expires) in self._entries.items() if expires >= now)

    def watch(self, name: str, *, timeout_s: float) -> SegmentInfo:
        return poll_until_registered(self, name, timeout_s=timeout_s)

    def close(self) -> None:
        pass


_REDIS_PREFIX = "kvstack:transfer:segment:"
# Compare-and-set in the server, so two owners never both believe they hold a name.
_REDIS_PUT = """
local old = redis.call('GET', KEYS[1])
if old and ARGV[3] == '0' and cjson.decode(old)['owner'] ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return 1
"""
_REDIS_DELETE = """
local old = redis.call('GET', KEYS[1])
if old and cjson.decode(old)['owner'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisMetadata:
    """Metadata in a Redis server (``redis://host:port/db``), for many hosts."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = url
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._put = self._client.register_script(_REDIS_PUT)
        self._delete = self._client.register_script(_REDIS_DELETE)

    def _call(
        self, what: str, fn: Callable[..., object], *args: object, **kwargs: object
    ) -> object:
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            raise MetadataError(f"{what} failed: {exc}", url=self.url) from exc

    def get(self, name: str) -> SegmentInfo:
        raw = self._call(f"GET {name!r}", self._client.get, _REDIS_PREFIX + name)
        if raw is None:
            raise SegmentNotFound(name)
        if not isinstance(raw, bytes | str):
            raise MetadataError(f"unexpected reply {raw!r} for {name!r}", url=self.url)
        return SegmentInfo.from_json(raw, source=self.url)

    def put(self, info: SegmentInfo, *, ttl_s: float, replace: bool = False) -> None:
        ok = self._call(
            f"PUT {info.name!r}",
            self._put,
            keys=[_REDIS_PREFIX + info.name],
            args=[info.to_json(), info.owner, "1" if replace else "0", max(1, int(ttl_s * 1000))],
        )
        if ok == 0:
            raise SegmentExists(info.name)

    def delete(self, name: str, *, owner: str) -> None:
        self._call(f"DELETE {name!r}", self._delete, keys=[_REDIS_PREFIX + name], args=[owner])

    def names(self) -> list[str]:
        keys = self._call("SCAN", lambda: list(self._client.scan_iter(_REDIS_PREFIX + "*")))
        if not isinstance(keys, list):
            raise MetadataError(f"unexpected SCAN reply {keys!r}", url=self.url)
        names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
        return sorted(n[len(_REDIS_PREFIX) :] for n in names)

    def watch(self, name: str, *, timeout_s: float) -> SegmentInfo:
        return poll_until_registered(self, name, timeout_s=timeout_s)

    def close(self) -> None:
        self._client.close()


class HttpMetadata:
    """Client of the embedded metadata server (``kvstack-transfer metadata``)."""

    def __init__(self, url: str, *, token: str | None, timeout_s: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        if not parsed.hostname or parsed.port is None:
            raise ConfigError(f"metadata URL {url!r} must name a host and port")
        self.url = url
        self._host, self._port = parsed.hostname, parsed.port
        self._timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # http.client connections are not thread-safe: one keep-alive connection per thread.
        self._local = threading.local()
        self._conns: set[http.client.HTTPConnection] = set()  # every thread's, for close()
        self._conns_lock = threading.Lock()

    def _request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
                self._local.conn = conn
                with self._conns_lock:
                    self._conns.add(conn)
            try:
                conn.request(method, path, body=body, headers=self._headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                with self._conns_lock:
                    self._conns.discard(conn)
                # A keep-alive connection the server closed fails once; retry on a fresh one.
                if attempt == 1 or isinstance(exc, TimeoutError):
                    raise MetadataError(f"{method} {path} failed: {exc}", url=self.url) from exc
        raise AssertionError("unreachable")

    def _path(self, name: str, **query: str) -> str:
        path = f"{API_PREFIX}/{urllib.parse.quote(name, safe='')}"
        return f"{path}?{urllib.parse.urlencode(query)}" if query else path

    def _check(self, status: int, body: bytes, what: str) -> None:
        if status == 401:
            raise MetadataError(f"{what}: token refused", url=self.url)
        if status >= 300:
            raise MetadataError(f"{what}: HTTP {status} {body[:200]!r}", url=self.url)

    def get(self, name: str) -> SegmentInfo:
        status, body = self._request("GET", self._path(name))
        if status == 404:
            raise SegmentNotFound(name)
        self._check(status, body, f"GET {name!r}")
        return SegmentInfo.from_json(body, source=self.url)

    def put(self, info: SegmentInfo, *, ttl_s: float, replace: bool = False) -> None:
        path = self._path(info.name, ttl_s=repr(ttl_s), replace="1" if replace else "0")
        status, body = self._request("PUT", path, info.to_json())
        if status == 409:
            raise SegmentExists(info.name)
        self._check(status, body, f"PUT {info.name!r}")

    def delete(self, name: str, *, owner: str) -> None:
        status, body = self._request("DELETE", self._path(name, owner=owner))
        self._check(status, body, f"DELETE {name!r}")

    def names(self) -> list[str]:
        status, body = self._request("GET", API_PREFIX)
        self._check(status, body, "GET names")
        try:
            names = json.loads(body)
        except ValueError as exc:
            raise MetadataError(f"unreadable name list {body[:200]!r}", url=self.url) from exc
        return [str(n) for n in names]

    def watch(self, name: str, *, timeout_s: float) -> SegmentInfo:
        return poll_until_registered(self, name, timeout_s=timeout_s)

    def close(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            conn.close()
        self._local = threading.local()


def open_metadata(url: str, *, token: str | None, timeout_s: float) -> MetadataBackend:
    """The backend for ``url``; raises ConfigError for an unknown scheme."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "memory":
        return MemoryMetadata(url)
    if scheme in ("redis", "rediss", "unix"):
        return RedisMetadata(url, timeout_s=timeout_s)
    if scheme == "http":
        return HttpMetadata(url, token=token, timeout_s=timeout_s)
    raise ConfigError(f"metadata URL {url!r}: unknown scheme {scheme!r} (http, redis, memory)")
