"""The master: object metadata, allocation over node segments, leases, eviction, membership.

One asyncio loop owns every table, so handlers never lock. No object bytes pass through here:
clients and nodes move them with kvstack.transfer, and the master hands nodes tasks (copy a
replica, demote to disk, promote back) in the replies to their polls, which are also their
heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import selectors
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kvstack.store._allocator import SegmentAllocator, aligned
from kvstack.store._checksum import DEFAULT_KIND, ChecksumKind, parse_kind
from kvstack.store._config import MAX_ATTRS_BYTES, MAX_KEY_BYTES, MasterConfig
from kvstack.store._metrics import MasterMetrics
from kvstack.store._persist import MetadataLog, ObjectLog, RedisLog
from kvstack.store._wire import (
    FLAG_ERROR,
    FLAG_REPLY,
    HEADER,
    Op,
    decode,
    encode,
    pack,
    parse_header,
)
from kvstack.store.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidKey,
    NoSpace,
    NotFound,
    ProtocolError,
    ReplicaUnavailable,
    StoreError,
    StoreTimeout,
)
from kvstack.transfer import MetadataServer

__all__ = ["Master", "check_key", "run_master_in_thread"]

logger = logging.getLogger(__name__)

_FRAME_TIMEOUT_S = 10.0
_TASK_TIMEOUT_S = 30.0
_REREPLICATE_PARALLEL = 16
_MAX_REPLICAS = 16
_MAX_UNREAD_BYTES = 256 << 20
# Tries to make room (evict, then wait for demotions or read leases to end) before NoSpace.
_ROOM_ATTEMPTS = 4
# Longest single wait for a read lease to end (so a put fails with NoSpace within ~8 s).
_LEASE_WAIT_S = 2.0
# Shared read-only defaults of a PUT_START item (never stored or mutated).
# A put started ahead (anonymous, see _put_start_one) and not committed within this long is
# freed: its client uses it within half a second or drops it.
_ANONYMOUS_PUT_S = 2.0
_NO_OPTIONS: dict[str, Any] = {}
_NO_ATTRS: dict[str, Any] = {}
# A commit's checksum kind by its wire value (a dict lookup; the enum's call costs ~0.5 us).
_KINDS: dict[object, ChecksumKind] = {str(kind): kind for kind in ChecksumKind}


class Tier(StrEnum):
    MEMORY = "memory"
    DISK = "disk"


def _checked_attrs(key: str, attrs: object) -> dict[str, Any]:
    if type(attrs) is not dict or (attrs and len(encode(attrs)) > MAX_ATTRS_BYTES):
        raise InvalidArgument(
            f"attrs of key {key!r} must be a JSON object of at most {MAX_ATTRS_BYTES} bytes"
        )
    return attrs


def check_key(key: object) -> str:
    """The key if valid; raises InvalidKey naming the limit broken."""
    # A str of at most a quarter of the limit in characters fits it in UTF-8 (4 bytes at
    # most a character): no encode on the common path (a 64-key GET checks 64 keys).
    if type(key) is str and 0 < len(key) <= MAX_KEY_BYTES // 4:
        return key
    if not isinstance(key, str):
        raise InvalidKey(key, reason=f"keys are str, got {type(key).__name__}")
    if not key:
        raise InvalidKey(key, reason="keys must not be empty")
    n = len(key.encode("utf-8", "surrogatepass"))
    if n > MAX_KEY_BYTES:
        raise InvalidKey(
            key[:40] + "...", reason=f"{n} bytes exceeds the limit of {MAX_KEY_BYTES} bytes"
        )
    return key


@dataclass(slots=True)
class Replica:
    node: str
    segment: str  # memory segment name, or the disk file name on the node
    offset: int
    tier: Tier = Tier.MEMORY
    # The node registration it was allocated under: a node declared dead that comes back is
    # a new generation, and frees of the old one must not touch its new allocators.
    generation: int = 0

    def to_wire(self) -> list[object]:
        return [self.node, self.segment, self.offset, str(self.tier)]

    @classmethod
    def from_wire(cls, data: list[Any]) -> Replica:
        return cls(str(data[0]), str(data[1]), int(data[2]), Tier(data[3]))


@dataclass(slots=True)
class Entry:
    key: str
    size: int
    checksum: int
    attrs: dict[str, Any]
    replicas: list[Replica]
    want: int
    checksum_kind: ChecksumKind = DEFAULT_KIND
    hard_pin: bool = False
    soft_pin_until: float = 0.0  # wall clock
    last_access: float = 0.0  # monotonic
    lease_until: float = 0.0  # monotonic
    # Readers under the lease that have not said they are done (see Master._release), its id
    # in GET replies (0 until first leased), and whether frees wait for it in _deferred.
    readers: int = 0
    lease_id: int = 0
    deferred: bool = False
    demoting: bool = False
    version: int = 0

    def to_record(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "checksum": self.checksum,
            "checksum_kind": str(self.checksum_kind),
            "attrs": self.attrs,
            "replicas": [r.to_wire() for r in self.replicas],
            "want": self.want,
            "hard_pin": self.hard_pin,
            "soft_pin_until": self.soft_pin_until,
        }

    @classmethod
    def from_record(cls, key: str, data: dict[str, Any]) -> Entry:
        return cls(
            key=key,
            size=int(data["size"]),
            checksum=int(data["checksum"]),
            # Records from before XXH3-64 have no kind: CRC-32, still verified as such.
            checksum_kind=parse_kind(data.get("checksum_kind"), what=f"record of key {key!r}"),
            attrs=dict(data.get("attrs") or {}),
            replicas=[Replica.from_wire(r) for r in data["replicas"]],
            want=int(data["want"]),
            hard_pin=bool(data.get("hard_pin")),
            soft_pin_until=float(data.get("soft_pin_until") or 0.0),
        )

    def memory(self) -> list[Replica]:
        return [r for r in self.replicas if r.tier is Tier.MEMORY]

    def disk(self) -> list[Replica]:
        return [r for r in self.replicas if r.tier is Tier.DISK]


@dataclass(slots=True)
class Pending:
    put_id: str
    key: str
    size: int
    replicas: list[Replica]
    want: int
    overwrite: bool
    hard_pin: bool
    soft_pin_until: float
    attrs: dict[str, Any]
    deadline: float


@dataclass(slots=True)
class NodeState:
    name: str
    incarnation: str
    segments: dict[str, SegmentAllocator]
    disk_bytes: int
    disk_used: int = 0
    last_seen: float = 0.0
    tasks: list[dict[str, Any]] = field(default_factory=list)
    # A client failed to write to it: place nothing new there until it polls again.
    suspect: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    generation: int = 0  # unique per registration
    capacity: int = 0  # bytes of all its segments (fixed at registration)
    largest_segment: int = 0

    def __post_init__(self) -> None:
        self.capacity = sum(a.capacity_bytes for a in self.segments.values())
        self.largest_segment = max((a.capacity_bytes for a in self.segments.values()), default=0)

    @property
    def used(self) -> int:
        return sum(a.used_bytes for a in self.segments.values())


class _Connection(asyncio.Protocol):
    """One client or node connection: frames parsed from the buffer as bytes arrive.

    A partial frame must complete within _FRAME_TIMEOUT_S; junk (bad magic, oversized length)
    gets an error reply and the connection is closed, since its framing is lost.
    """

    def __init__(self, master: Master) -> None:
        self.master = master
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("the master serves stream transports only")
        self.transport = transport
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"
        else:  # a same-host client on the Unix socket (its peer name is empty)
            self.peer = "unix"

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if not buf:
            # The common case, whole requests per read (one, or a commit and the start sent
            # behind it): no copies through the buffer.
            pos, size = 0, len(data)
            while size - pos >= HEADER.size:
                try:
                    op, _flags, request_id, length = parse_header(
                        data[pos : pos + HEADER.size], peer=self.peer
                    )
                except ProtocolError as exc:
                    self._fatal(exc)
                    return
                end = pos + HEADER.size + length
                if end > size:
                    break
                self.master._dispatch(self, op, request_id, data[pos + HEADER.size : end])
                pos = end
                if self.transport is None or self.transport.is_closing():
                    return
            if pos == size:
                return
            data = data[pos:]
        buf += data
        while len(buf) >= HEADER.size:
            try:
                op, _flags, request_id, length = parse_header(
                    bytes(buf[: HEADER.size]), peer=self.peer
                )
            except ProtocolError as exc:
                self._fatal(exc)
                return
            end = HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[HEADER.size : end])
            del buf[:end]
            self.master._dispatch(self, op, request_id, payload)
            if self.transport is None or self.transport.is_closing():
                return
        if buf and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FRAME_TIMEOUT_S, self._expired)
        elif not buf and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._buf:
            self._fatal(
                ProtocolError(
                    f"truncated frame: {len(self._buf)} bytes then silence for "
                    f"{_FRAME_TIMEOUT_S:g} s",
                    peer=self.peer,
                )
            )

    def _fatal(self, exc: ProtocolError) -> None:
        logger.warning("closing connection from %s: %s", self.peer, exc)
        self.reply(0, 0, exc.to_wire(), error=True)
        self._buf.clear()
        if self.transport is not None:
            self.transport.close()

    def reply(self, op: int, request_id: int, data: object, *, error: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        flags = FLAG_REPLY | (FLAG_ERROR if error else 0)
        transport.write(pack(op, request_id, encode(data), flags=flags))
        if transport.get_write_buffer_size() > _MAX_UNREAD_BYTES:
            # A peer that sends requests but never reads replies: drop it, not our memory.
            logger.warning("closing connection from %s: replies not read", self.peer)
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None


class Master:
    """Serves the store's control plane on ``config.host:config.port``."""

    def __init__(self, config: MasterConfig | None = None) -> None:
        self.config = config or MasterConfig()
        self.epoch = uuid.uuid4().hex
        self.metrics = MasterMetrics()
        self.metrics_port: int | None = None
        self.port = self.config.port
        self.metadata_url = self.config.metadata_url or ""
        self._entries: dict[str, Entry] = {}
        self._object_bytes = 0
        self._joined = asyncio.Event()
        self._pending: dict[str, Pending] = {}
        self._nodes: dict[str, NodeState] = {}
        # Running totals over live nodes' memory, so a put's watermark check is O(1) (a sum
        # over every segment per put cost a few us of PUT_START, issue 4): capacity and the
        # largest segment change with membership, used bytes with every allocate and free.
        self._capacity = 0
        self._used = 0
        self._largest_segment = 0
        self._segment_owner: dict[str, str] = {}
        # Frees waiting for a read lease: (until, node, replica, size, lease id).
        self._deferred: list[tuple[float, str, Replica, int, int]] = []
        # Entries (live or replaced) with a lease that may still be released early, by id.
        self._leases: dict[int, Entry] = {}
        # From a random start: a client may release an id from before a master restart, which
        # must not name a lease of this master (a reader's bytes freed under it).
        self._lease_ids = itertools.count((1 << 61) + secrets.randbits(60))
        self._under: set[str] = set()
        self._rereplicating: set[str] = set()
        self._task_ids = itertools.count(1)
        self._task_futures: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._task_nodes: dict[int, str] = {}
        self._demotions: set[asyncio.Future[dict[str, Any]]] = set()
        self._put_ids = itertools.count(1)
        self._put_prefix = f"{self.epoch[:8]}-"
        self._generations = itertools.count(1)
        self._log: ObjectLog | None = None
        if self.config.redis_url:
            self._log = RedisLog(self.config.redis_url)
        elif self.config.data_dir:
            self._log = MetadataLog(self.config.data_dir)
        self._server: asyncio.Server | None = None
        self._unix_server: asyncio.Server | None = None
        # Same-host clients talk over this abstract Unix socket (Linux), told in HELLO: ~7 us
        # less per round trip than loopback TCP on the 2-core box (asyncio echo p50 28 vs 35 us,
        # issue 4). Unique per master process, so it never reaches another (or a restarted)
        # master; it needs no file and vanishes with the process.
        self.unix_address = f"\0kvstack-store-{self.epoch}" if sys.platform == "linux" else ""
        self._metadata_server: MetadataServer | None = None
        self._background: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._started = 0.0
        self._recovered_nodes: set[str] = set()
        self._ops: dict[int, Callable[[dict[str, Any]], Any]] = {
            Op.HELLO: self._hello,
            Op.REGISTER_NODE: self._register_node,
            Op.PUT_START: self._put_start,
            Op.PUT_COMMIT: self._put_commit,
            Op.PUT_ABORT: self._put_abort,
            Op.EXISTS: self._exists,
            Op.REMOVE: self._remove,
            Op.STATS: self._stats,
            Op.NODE_POLL: self._node_poll,
            Op.GET: self._get,
        }
        self._latency = {op: self.metrics.latency.labels(Op(op).name) for op in self._ops}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = time.monotonic()
        if self._log is not None:
            for key, record in self._log.load().items():
                entry = Entry.from_record(key, record)
                entry.last_access = self._started
                self._insert(entry)
                self._recovered_nodes.update(r.node for r in entry.replicas)
        if not self.config.metadata_url:
            self._metadata_server = MetadataServer(
                host=self.config.host, port=self.config.metadata_port
            )
            await self._metadata_server.start()
            self.metadata_url = f"http://{self.config.host}:{self._metadata_server.port}"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.config.host, self.config.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self.unix_address:
            try:
                self._unix_server = await loop.create_unix_server(
                    lambda: _Connection(self), self.unix_address
                )
            except OSError as exc:  # TCP still serves everyone
                logger.warning("no Unix socket for same-host clients: %s", exc)
                self.unix_address = ""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self._background = [
            asyncio.create_task(self._reaper(), name="kvstack-store-reaper"),
            asyncio.create_task(self._rereplicator(), name="kvstack-store-rereplicator"),
        ]
        logger.info(
            "master %s listening on %s:%d (metadata %s, %d objects recovered)",
            self.epoch[:8],
            self.config.host,
            self.port,
            self.metadata_url,
            len(self._entries),
        )

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        server = self._server
        if server is None:
            raise StoreError("master failed to start")
        async with server:
            await server.serve_forever()

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self._unix_server is not None:
            self._unix_server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._unix_server is not None:
            await self._unix_server.wait_closed()
            self._unix_server = None
        if self._metadata_server is not None:
            await self._metadata_server.close()
        if self._log is not None:
            self._log.close()

    # -- the wire -------------------------------------------------------------------------

    def _dispatch(self, conn: _Connection, op: int, request_id: int, payload: bytes) -> None:
        """Run one request; sync handlers reply at once, async ones (polls, promotions) later."""
        started = time.perf_counter()
        try:
            handler = self._ops.get(op)
            if handler is None:
                raise ProtocolError(f"unknown op {op}", peer=conn.peer)
            data = decode(payload, peer=conn.peer)
            released = data.get("released") if isinstance(data, dict) else None
            if released is not None:
                self._release(released)
            result = handler(data)
        except StoreError as exc:
            conn.reply(op, request_id, exc.to_wire(), error=True)
            return
        except Exception as exc:
            logger.exception("op %s from %s failed", op, conn.peer)
            error = StoreError(f"internal error in op {op}: {exc!r}")
            conn.reply(op, request_id, error.to_wire(), error=True)
            return
        if type(result) is dict or not asyncio.iscoroutine(result):
            conn.reply(op, request_id, result)
            self._latency[op].observe(time.perf_counter() - started)
            return
        task = asyncio.ensure_future(result)
        self._handlers.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._handlers.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if isinstance(exc, StoreError):
                conn.reply(op, request_id, exc.to_wire(), error=True)
            elif exc is not None:
                logger.error("op %s from %s failed: %r", op, conn.peer, exc)
                error = StoreError(f"internal error in op {op}: {exc!r}")
                conn.reply(op, request_id, error.to_wire(), error=True)
            else:
                conn.reply(op, request_id, t.result())
                self._latency[op].observe(time.perf_counter() - started)

        task.add_done_callback(done)

    @staticmethod
    def _items(data: dict[str, Any]) -> list[Any]:
        items = data.get("items")
        if not isinstance(items, list):
            raise InvalidArgument(f"request needs 'items' as a list, got {type(items).__name__}")
        return items

    @staticmethod
    def _per_item(items: list[Any], fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        out: list[dict[str, Any]] = []
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise InvalidArgument(f"batch item must be an object, got {item!r:.80}")
                out.append({"ok": fn(item)})
            except StoreError as exc:
                out.append({"error": exc.to_wire()})
        return {"items": out}

    # -- handlers -------------------------------------------------------------------------

    def _hello(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "metadata_url": self.metadata_url,
            "lease_s": self.config.lease_s,
            "max_key_bytes": MAX_KEY_BYTES,
            "unix_address": self.unix_address,
        }

    def _register_node(self, data: dict[str, Any]) -> dict[str, Any]:
        name = data.get("name")
        incarnation = data.get("incarnation")
        segments = data.get("segments")
        if not isinstance(name, str) or not isinstance(incarnation, str):
            raise InvalidArgument("REGISTER_NODE needs 'name' and 'incarnation' strings")
        if not isinstance(segments, list):
            raise InvalidArgument("REGISTER_NODE needs 'segments' as [[name, size], ...]")
        try:
            sizes = {str(seg): int(size) for seg, size in segments}
            disk_bytes = int(data.get("disk_bytes") or 0)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"REGISTER_NODE of {name!r}: segments must be [[name, size], ...]"
            ) from None
        old = self._nodes.get(name)
        if old is not None and old.incarnation == incarnation:
            old.last_seen = time.monotonic()  # a retried registration: nothing changed
            return {"epoch": self.epoch, "metadata_url": self.metadata_url}
        if old is not None:
            self._declare_dead(name, reason="re-registered with a new incarnation")
        node = NodeState(
            name=name,
            incarnation=incarnation,
            segments={seg: SegmentAllocator(size) for seg, size in sizes.items()},
            disk_bytes=disk_bytes,
            last_seen=time.monotonic(),
            generation=next(self._generations),
        )
        disk_files = set(data.get("disk_files") or [])
        # Objects recovered from the log may live on this node: reserve their bytes again.
        used: dict[str, list[tuple[int, int]]] = {s: [] for s in node.segments}
        for entry in list(self._entries.values()):
            kept: list[Replica] = []
            for r in entry.replicas:
                if r.node != name:
                    kept.append(r)
                elif r.tier is Tier.MEMORY and r.segment in used:
                    used[r.segment].append((r.offset, entry.size))
                    r.generation = node.generation
                    kept.append(r)
                elif r.tier is Tier.DISK and r.segment in disk_files:
                    node.disk_used += aligned(entry.size)
                    r.generation = node.generation
                    kept.append(r)
            if len(kept) != len(entry.replicas):
                entry.replicas = kept
                self._changed(entry)
        for seg, ranges in used.items():
            node.segments[seg].rebuild(ranges)
        self._nodes[name] = node
        self._used += node.used
        self._membership_changed()
        self._joined.set()
        for seg in node.segments:
            self._segment_owner[seg] = name
        logger.info(
            "node %r registered: %d segments, %d bytes memory, %d bytes disk",
            name,
            len(node.segments),
            node.capacity,
            node.disk_bytes,
        )
        self.metrics.nodes.set(len(self._nodes))
        return {"epoch": self.epoch, "metadata_url": self.metadata_url}

    async def _node_poll(self, data: dict[str, Any]) -> dict[str, Any]:
        name = data.get("name")
        node = self._nodes.get(name) if isinstance(name, str) else None
        if node is None or node.incarnation != data.get("incarnation"):
            return {"reregister": True}
        node.last_seen = time.monotonic()
        node.suspect = False
        for result in data.get("done") or []:
            if not isinstance(result, dict) or not isinstance(result.get("id"), int):
                raise InvalidArgument(f"NODE_POLL of {name!r}: bad task result {result!r:.80}")
            task_id = result["id"]
            self._task_nodes.pop(task_id, None)
            future = self._task_futures.pop(task_id, None)
            if future is not None and not future.done():
                future.set_result(result)
        if not node.tasks and data.get("wait", True):
            node.wake.clear()
            wait_s = min(0.5, self.config.heartbeat_timeout_s / 4)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.wake.wait(), wait_s)
        tasks = node.tasks
        node.tasks = []
        node.last_seen = time.monotonic()
        return {"tasks": tasks}

    def _put_start(self, data: dict[str, Any]) -> Any:
        items = self._items(data)
        reply = self._per_item(items, self._put_start_one)
        retry = [
            i
            for i, out in enumerate(reply["items"])
            if out.get("error", {}).get("fields", {}).get("transient")
        ]
        if not retry:
            return reply
        return self._put_start_later(items, reply, retry)

    async def _put_start_later(
        self, items: list[Any], reply: dict[str, Any], retry: list[int]
    ) -> dict[str, Any]:
        for _attempt in range(_ROOM_ATTEMPTS):
            if not retry or not await self._wait_for_room():
                break
            again = self._per_item([items[i] for i in retry], self._put_start_one)
            still: list[int] = []
            for i, out in zip(retry, again["items"], strict=True):
                reply["items"][i] = out
                if out.get("error", {}).get("fields", {}).get("transient"):
                    still.append(i)
            retry = still
        return reply

    def _in_grace(self) -> bool:
        """True while a restarted master still waits for nodes it knows objects on."""
        return bool(self._recovered_nodes - set(self._nodes)) and (
            time.monotonic() - self._started < 2 * self.config.heartbeat_timeout_s
        )

    async def _wait_for_room(self) -> bool:
        """Wait until memory may be freed: demotions in flight finish, or the earliest read
        lease on an evictable object ends, or (after a restart) a node re-registers. False when
        nothing will free memory by itself."""
        if self._in_grace():
            self._joined.clear()
            left = 2 * self.config.heartbeat_timeout_s - (time.monotonic() - self._started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), max(left, 0.001))
            return True
        if self._demotions:
            await asyncio.wait(
                set(self._demotions), timeout=_TASK_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            return True
        now = time.monotonic()
        leases = [
            e.lease_until
            for e in self._entries.values()
            if e.lease_until > now and not e.hard_pin and e.size and e.memory()
        ]
        if not leases:
            return False
        self.metrics.lease_waits.inc()
        await asyncio.sleep(min(min(leases) - now, _LEASE_WAIT_S) + 0.001)  # until a lease ends
        return True

    def _put_start_one(self, item: dict[str, Any]) -> dict[str, Any]:
        # The costliest step of a put (issue 4): options absent from the request take their
        # defaults without a check, and nothing here is O(nodes) or O(objects) (see _capacity).
        # An anonymous start ("anonymous": true, no key) allocates for a client's next put:
        # its commit names the key, overwrite and attrs (see _put_commit).
        anonymous = item.get("anonymous") is True
        key = "" if anonymous else check_key(item.get("key"))
        size = item.get("size")
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"size of key {key!r} must be an int >= 0, got {size!r}")
        options = item.get("options") or _NO_OPTIONS
        if type(options) is not dict:
            raise InvalidArgument(f"options of key {key!r} must be an object, got {options!r:.80}")
        want = options.get("replicas", 1)
        if type(want) is not int or not 1 <= want <= _MAX_REPLICAS:
            raise InvalidArgument(
                f"replicas of key {key!r} must be an int in 1..{_MAX_REPLICAS}, got {want!r:.40}"
            )
        soft_pin_s = options.get("soft_pin_s") or 0.0
        if soft_pin_s and (not isinstance(soft_pin_s, int | float) or soft_pin_s < 0):
            raise InvalidArgument(
                f"soft_pin_s of key {key!r} must be a number >= 0, got {soft_pin_s!r:.40}"
            )
        preferred = options.get("preferred_node")
        if preferred is not None and not isinstance(preferred, str):
            raise InvalidArgument(f"preferred_node of key {key!r} must be a str or null")
        overwrite = bool(options.get("overwrite"))
        attrs = _checked_attrs(key, item.get("attrs") or _NO_ATTRS)
        if not anonymous and not overwrite and key in self._entries:
            raise AlreadyExists(key)
        if anonymous:
            replicas = self._allocate_ahead(size, want, preferred) if size else []
        else:
            replicas = self._allocate(key, size, want, preferred) if size else []
        put_id = f"{self._put_prefix}{next(self._put_ids)}"
        timeout_s = self.config.put_timeout_s
        if anonymous:
            timeout_s = min(timeout_s, _ANONYMOUS_PUT_S)
        self._pending[put_id] = Pending(
            put_id,
            key,
            size,
            replicas,
            want,
            overwrite,
            bool(options.get("hard_pin")),
            (time.time() + min(soft_pin_s, self.config.max_soft_pin_s) if soft_pin_s else 0.0),
            attrs if attrs is not _NO_ATTRS else {},
            time.monotonic() + timeout_s,
        )
        started: dict[str, Any] = {"put_id": put_id, "replicas": [r.to_wire() for r in replicas]}
        if anonymous:  # the client must use it well before the reaper frees it
            started["expires_s"] = timeout_s
        return started

    def _put_commit(self, data: dict[str, Any]) -> dict[str, Any]:
        return self._per_item(self._items(data), self._put_commit_one)

    def _put_commit_one(self, item: dict[str, Any]) -> dict[str, Any]:
        put_id = item.get("put_id")
        pending = self._pending.pop(put_id, None) if isinstance(put_id, str) else None
        if pending is None:
            raise StoreError(f"put {put_id!r} is unknown: it expired or the master restarted")
        if not pending.key:  # an anonymous start: the commit names the object
            try:
                key = check_key(item.get("key"))
                attrs = item.get("attrs")
                if attrs:
                    pending.attrs = dict(_checked_attrs(key, attrs))
            except StoreError:
                self._free_all(pending.replicas, pending.size)
                raise
            pending.key, pending.overwrite = key, bool(item.get("overwrite"))
        checksum = item.get("checksum")
        if not isinstance(checksum, int):
            self._free_all(pending.replicas, pending.size)
            raise InvalidArgument(f"commit of key {pending.key!r} needs an int checksum")
        kind = _KINDS.get(item.get("checksum_kind"))
        if kind is None:
            self._free_all(pending.replicas, pending.size)
            known = ", ".join(repr(str(k)) for k in ChecksumKind)
            raise InvalidArgument(
                f"commit of key {pending.key!r} has checksum_kind "
                f"{item.get('checksum_kind')!r}: want one of {known}"
            )
        failed = item.get("failed")
        if not failed:  # the common case: every replica written
            live = [r for r in pending.replicas if self._live(r)]
        else:
            if not isinstance(failed, list) or not all(isinstance(i, int) for i in failed):
                self._free_all(pending.replicas, pending.size)
                raise InvalidArgument(f"commit of key {pending.key!r}: 'failed' must list ints")
            # Replicas the client could not write are freed; re-replication restores the
            # count. Their nodes get no new replicas until they prove alive by polling again.
            replicas = pending.replicas
            self._free_all([r for i, r in enumerate(replicas) if i in failed], pending.size)
            for i in failed:
                node = self._live(replicas[i]) if 0 <= i < len(replicas) else None
                if node is not None:
                    node.suspect = True
            live = [r for i, r in enumerate(replicas) if self._live(r) and i not in failed]
        if pending.size and not live:
            raise ReplicaUnavailable(pending.key, reasons=["every node it was written to died"])
        old = self._entries.get(pending.key)
        if old is not None:
            if not pending.overwrite:
                self._free_all(live, pending.size)
                raise AlreadyExists(pending.key)
            self._retire(old)
        entry = Entry(
            key=pending.key,
            size=pending.size,
            checksum=checksum,
            checksum_kind=kind,
            attrs=pending.attrs,
            replicas=live,
            want=pending.want,
            hard_pin=pending.hard_pin,
            soft_pin_until=pending.soft_pin_until,
            last_access=time.monotonic(),
            version=(old.version + 1) if old else 0,
        )
        if old is not None:
            self._discard(old.key)
        self._insert(entry)
        self._changed(entry)
        if pending.size and len(live) < pending.want:
            self._under.add(entry.key)
        return {}

    def _put_abort(self, data: dict[str, Any]) -> dict[str, Any]:
        def one(item: dict[str, Any]) -> dict[str, Any]:
            pending = self._pending.pop(str(item.get("put_id")), None)
            if pending is not None:
                self._free_all(pending.replicas, pending.size)
            return {}

        return self._per_item(self._items(data), one)

    def _release(self, released: object) -> None:
        """Readers done with what they read: ids of GET replies' leases, one per item read, that
        a client sends with its next request (so after its copies). A lease whose readers are
        all done ends now, and frees waiting for it happen now. Without this, overwriting keys
        that were just read filled memory with frees deferred for whole leases, until eviction
        dropped live objects (issue 4)."""
        if not isinstance(released, list) or not all(type(i) is int for i in released):
            raise InvalidArgument(f"'released' must be a list of lease ids, got {released!r:.80}")
        now = time.monotonic()
        for lease_id in released:
            entry = self._leases.get(lease_id)
            if entry is None:
                continue  # ended already: by time, or all its readers released it
            entry.readers -= 1
            if entry.readers > 0 and entry.lease_until > now:
                continue
            del self._leases[lease_id]
            entry.readers = 0
            entry.lease_until = min(entry.lease_until, now)
            if entry.deferred:
                entry.deferred = False
                due = [d for d in self._deferred if d[4] == lease_id]
                self._deferred = [d for d in self._deferred if d[4] != lease_id]
                for _until, _node, replica, size, _lease in due:
                    self._free(replica, size)

    def _get(self, data: dict[str, Any]) -> Any:
        out: list[dict[str, Any]] = []
        promote: dict[int, Entry] = {}
        hits = misses = 0
        for i, item in enumerate(self._items(data)):
            try:
                if not isinstance(item, dict):
                    raise InvalidArgument(f"batch item must be an object, got {item!r:.80}")
                found = self._get_one(item)
            except NotFound as exc:
                misses += 1
                out.append({"error": exc.to_wire()})
                continue
            except StoreError as exc:
                out.append({"error": exc.to_wire()})
                continue
            hits += 1
            if isinstance(found, Entry):
                promote[i] = found
                out.append({})
            else:
                out.append({"ok": found})
        # Counted once a request: a Prometheus inc per key cost more than the lookup.
        if hits:
            self.metrics.hits.inc(hits)
        if misses:
            self.metrics.misses.inc(misses)
        if not promote:
            return {"items": out}
        return self._get_promoting(out, promote)

    async def _get_promoting(
        self, out: list[dict[str, Any]], promote: dict[int, Entry]
    ) -> dict[str, Any]:
        for i, entry in promote.items():
            try:
                replicas = await self._promote(entry)
                out[i] = {"ok": self._located(entry, replicas)}
            except StoreError as exc:
                out[i] = {"error": exc.to_wire()}
        return {"items": out}

    def _get_one(self, item: dict[str, Any]) -> dict[str, Any] | Entry:
        key = check_key(item.get("key"))
        entry = self._entries.get(key)
        if entry is None:
            raise NotFound(key)  # counted by the caller
        memory = [r for r in entry.replicas if r.tier is Tier.MEMORY and r.node in self._nodes]
        if entry.size and not memory:
            return entry
        return self._located(entry, memory)

    def _located(self, entry: Entry, memory: list[Replica]) -> dict[str, Any]:
        now = time.monotonic()
        entry.last_access = now
        if entry.lease_until <= now:
            # A new lease, under a new id: a late release of the ended one must not end it.
            self._leases.pop(entry.lease_id, None)
            entry.readers = 0
            entry.lease_id = next(self._lease_ids)
        entry.readers += 1
        entry.lease_until = max(entry.lease_until, now + self.config.lease_s)
        self._leases[entry.lease_id] = entry
        located: dict[str, Any] = {
            "size": entry.size,
            "checksum": entry.checksum,
            "attrs": entry.attrs,
            "replicas": [[r.node, r.segment, r.offset] for r in memory],
            "lease": entry.lease_id,
        }
        if entry.checksum_kind is not DEFAULT_KIND:  # the reader's default; others are named
            located["checksum_kind"] = str(entry.checksum_kind)
        return located

    def _exists(self, data: dict[str, Any]) -> dict[str, Any]:
        return self._per_item(
            self._items(data), lambda item: {"exists": check_key(item.get("key")) in self._entries}
        )

    def _remove(self, data: dict[str, Any]) -> dict[str, Any]:
        def one(item: dict[str, Any]) -> dict[str, Any]:
            key = check_key(item.get("key"))
            entry = self._discard(key)
            if entry is None:
                raise NotFound(key)
            self._retire(entry)
            if self._log is not None:
                self._log.append({"op": "del", "key": key})
            return {}

        return self._per_item(self._items(data), one)

    def _stats(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.stats()

    def _usage(self) -> tuple[dict[str, Any], int, int]:
        """Per-node usage (and the gauges of it): (nodes, capacity bytes, used bytes)."""
        nodes: dict[str, Any] = {}
        capacity = used = 0
        for node in self._nodes.values():
            segs: dict[str, Any] = {}
            for seg, alloc in node.segments.items():
                s = alloc.stats()
                capacity += s.capacity_bytes
                used += s.used_bytes
                segs[seg] = {
                    "capacity_bytes": s.capacity_bytes,
                    "used_bytes": s.used_bytes,
                    "utilisation": round(s.utilisation, 4),
                    "fragmentation": round(s.fragmentation, 4),
                    "free_blocks": s.free_blocks,
                    "allocations": s.allocations,
                }
                self.metrics.capacity.labels(node.name, seg, "memory").set(s.capacity_bytes)
                self.metrics.used.labels(node.name, seg, "memory").set(s.used_bytes)
                self.metrics.fragmentation.labels(node.name, seg).set(s.fragmentation)
            self.metrics.capacity.labels(node.name, "disk", "disk").set(node.disk_bytes)
            self.metrics.used.labels(node.name, "disk", "disk").set(node.disk_used)
            nodes[node.name] = {
                "segments": segs,
                "disk_bytes": node.disk_bytes,
                "disk_used_bytes": node.disk_used,
                "last_seen_s_ago": round(time.monotonic() - node.last_seen, 3),
            }
        self.metrics.objects.set(len(self._entries))
        self.metrics.object_bytes.set(self._object_bytes)
        self._check_usage(used)
        return nodes, capacity, used

    def stats(self) -> dict[str, Any]:
        """Objects, bytes, per-node and per-segment usage and fragmentation."""
        nodes, capacity, used = self._usage()
        object_bytes = self._object_bytes
        on_disk = sum(1 for e in self._entries.values() if e.disk() and not e.memory())
        return {
            "epoch": self.epoch,
            "objects": len(self._entries),
            "object_bytes": object_bytes,
            "objects_on_disk_only": on_disk,
            "pending_puts": len(self._pending),
            "capacity_bytes": capacity,
            "used_bytes": used,
            "utilisation": round(used / capacity, 4) if capacity else 0.0,
            "under_replicated": len(self._under),
            "deferred_frees": len(self._deferred),
            "nodes": nodes,
        }

    # -- allocation and eviction ----------------------------------------------------------

    def _allocate(self, key: str, size: int, want: int, preferred: object) -> list[Replica]:
        if size == 0:
            return []
        if size > self._largest_segment:
            raise NoSpace(
                key,
                size_bytes=size,
                replicas=want,
                detail=f"larger than every segment of the {len(self._nodes)} live nodes",
                transient=self._in_grace(),
            )
        self._maybe_evict(aligned(size) * want)
        replicas = self._place(size, want, preferred, exclude=set())
        if not replicas:
            self._make_room(aligned(size) * want)
            replicas = self._place(size, want, preferred, exclude=set())
        if not replicas:
            raise NoSpace(
                key,
                size_bytes=size,
                replicas=want,
                detail=(
                    f"no free block of {aligned(size)} bytes on any of {len(self._nodes)} "
                    "live nodes after eviction (leased and pinned objects are kept)"
                ),
                transient=True,
            )
        return replicas

    def _allocate_ahead(self, size: int, want: int, preferred: object) -> list[Replica]:
        """Space for a put started ahead, which may never be used: only free memory below
        the high watermark, never an eviction. NoSpace (not transient: nothing waits for
        room) otherwise; the client's put then starts the usual way, evicting if it must."""
        capacity = self._capacity
        need = aligned(size) * want
        replicas: list[Replica] = []
        if not capacity or self._used + need <= self.config.high_watermark * capacity:
            replicas = self._place(size, want, preferred, exclude=set())
        if not replicas:
            raise NoSpace(
                "",
                size_bytes=size,
                replicas=want,
                detail="a put started ahead takes only free memory below the high watermark",
                transient=False,
            )
        return replicas

    def _place(
        self, size: int, want: int, preferred: object, *, exclude: set[str]
    ) -> list[Replica]:
        """Best effort: up to ``want`` replicas on distinct nodes, the freest first."""
        nodes = [n for n in self._nodes.values() if n.name not in exclude and not n.suspect]
        if len(nodes) > 1:  # the sort key sums every segment's usage: not for one node
            nodes.sort(
                key=lambda n: (n.name != preferred, -(n.capacity - n.used) / max(n.capacity, 1))
            )
        replicas: list[Replica] = []
        for node in nodes:
            if len(replicas) == want:
                break
            segments = list(node.segments.items())
            if len(segments) > 1:
                segments.sort(key=lambda s: s[1].used_bytes - s[1].capacity_bytes)
            for seg, alloc in segments:
                offset = alloc.allocate(size)
                if offset is not None:
                    self._used += aligned(size)
                    replicas.append(Replica(node.name, seg, offset, generation=node.generation))
                    break
        return replicas

    def _membership_changed(self) -> None:
        nodes = self._nodes.values()
        self._capacity = sum(n.capacity for n in nodes)
        self._largest_segment = max((n.largest_segment for n in nodes), default=0)

    def _memory_used(self) -> int:
        return self._used

    def _check_usage(self, used: int) -> None:
        """Resync the running total with ``used`` (summed over every allocator) if it drifted."""
        if used != self._used:
            logger.error(
                "memory usage total drifted: %d bytes counted, %d in the allocators; resynced",
                self._used,
                used,
            )
            self._used = used

    def _maybe_evict(self, need: int) -> None:
        capacity = self._capacity
        if capacity and self._used + need > self.config.high_watermark * capacity:
            self._evict(int(self.config.low_watermark * capacity) - need)

    def _make_room(self, need: int) -> None:
        capacity = self._capacity
        low = int(self.config.low_watermark * capacity)
        self._evict(min(self._memory_used() - need, low))

    def _evict(self, target_used: int) -> None:
        """Free memory replicas, least recently used first, soft-pinned last, until
        usage <= target_used. Leased, hard-pinned and in-flight objects are never touched."""
        used = self._memory_used()
        if used <= target_used:
            return
        now = time.monotonic()
        wall = time.time()
        candidates: list[Entry] = []
        for entry in self._entries.values():
            if entry.hard_pin or entry.demoting or not entry.size or not entry.memory():
                continue
            if entry.lease_until > now:
                self.metrics.lease_waits.inc()
                continue
            candidates.append(entry)
        candidates.sort(key=lambda e: (e.soft_pin_until > wall, e.last_access))
        evicted = demoted = 0
        for entry in candidates:
            if used <= target_used:
                break
            memory = [r for r in entry.memory() if r.node in self._nodes]
            used -= aligned(entry.size) * len(memory)
            if entry.disk():
                self._drop_memory(entry)
                demoted += 1
                continue
            disk_node = self._disk_node(entry)
            if disk_node is not None:
                self._demote(entry, disk_node)
                demoted += 1
            else:
                self._discard(entry.key)
                self._retire(entry)
                if self._log is not None:
                    self._log.append({"op": "del", "key": entry.key})
                evicted += 1
        self.metrics.evictions.labels("drop").inc(evicted)
        self.metrics.evictions.labels("demote").inc(demoted)
        if evicted or demoted:
            logger.info(
                "eviction pass: %d dropped, %d demoted to disk, memory used now ~%d bytes",
                evicted,
                demoted,
                used,
            )

    def _disk_node(self, entry: Entry) -> NodeState | None:
        for r in entry.memory():
            node = self._nodes.get(r.node)
            if node is not None and node.disk_used + aligned(entry.size) <= node.disk_bytes:
                return node
        return None

    def _drop_memory(self, entry: Entry) -> None:
        """Keep only the disk copy; memory under a read lease is freed when the lease ends."""
        memory = entry.memory()
        entry.replicas = entry.disk()
        if entry.lease_until > time.monotonic():
            self.metrics.lease_waits.inc()
            entry.deferred = True
            self._deferred.extend(
                (entry.lease_until, r.node, r, entry.size, entry.lease_id) for r in memory
            )
        else:
            for r in memory:
                self._free(r, entry.size)
        self._changed(entry)

    def _demote(self, entry: Entry, node: NodeState) -> None:
        source = next(r for r in entry.memory() if r.node == node.name)
        file = f"{uuid.uuid4().hex}.bin"
        node.disk_used += aligned(entry.size)
        entry.demoting = True
        version = entry.version
        future = self._task(
            node,
            {
                "kind": "demote",
                "segment": source.segment,
                "offset": source.offset,
                "length": entry.size,
                "file": file,
            },
        )
        self._demotions.add(future)

        def done(f: asyncio.Future[dict[str, Any]]) -> None:
            self._demotions.discard(f)
            entry.demoting = False
            ok = not f.cancelled() and f.exception() is None and bool(f.result().get("ok"))
            current = self._entries.get(entry.key)
            if not ok or current is not entry or entry.version != version:
                node.disk_used -= aligned(entry.size)
                if ok and self._nodes.get(node.name) is node:
                    node.tasks.append({"kind": "drop_disk", "id": 0, "file": file})
                    node.wake.set()
                return
            entry.replicas.append(Replica(node.name, file, 0, Tier.DISK, node.generation))
            self._drop_memory(entry)

        future.add_done_callback(done)

    async def _promote(self, entry: Entry) -> list[Replica]:
        disk = [r for r in entry.disk() if r.node in self._nodes]
        if not disk:
            raise ReplicaUnavailable(
                entry.key, reasons=["every node holding a replica is dead or not yet registered"]
            )
        source = disk[0]
        node = self._nodes[source.node]
        target: Replica | None = None
        for _attempt in range(_ROOM_ATTEMPTS):
            replicas = self._place(entry.size, 1, node.name, exclude=set())
            if replicas and replicas[0].node == node.name:
                target = replicas[0]
                break
            self._free_all(replicas, entry.size)
            self._make_room(aligned(entry.size))
            replicas = self._place(entry.size, 1, node.name, exclude=set())
            if replicas and replicas[0].node == node.name:
                target = replicas[0]
                break
            self._free_all(replicas, entry.size)
            if not await self._wait_for_room():
                break
        if target is None:
            raise NoSpace(
                entry.key,
                size_bytes=entry.size,
                replicas=1,
                detail=f"cannot promote from disk: no room on node {node.name!r}",
            )
        future = self._task(
            node,
            {
                "kind": "promote",
                "file": source.segment,
                "segment": target.segment,
                "offset": target.offset,
                "length": entry.size,
            },
        )
        try:
            result = await asyncio.wait_for(future, _TASK_TIMEOUT_S)
        except TimeoutError:
            self._free(target, entry.size)
            raise StoreTimeout(
                f"promotion of key {entry.key!r} from disk",
                timeout_s=_TASK_TIMEOUT_S,
                key=entry.key,
            ) from None
        if not result.get("ok") or self._entries.get(entry.key) is not entry:
            self._free(target, entry.size)
            raise ReplicaUnavailable(
                entry.key, reasons=[str(result.get("error", "promote failed"))]
            )
        entry.replicas.append(target)
        self._changed(entry)
        self.metrics.promotions.inc()
        return [target]

    def _task(self, node: NodeState, task: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        task_id = next(self._task_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._task_futures[task_id] = future
        self._task_nodes[task_id] = node.name

        def forget(_: asyncio.Future[dict[str, Any]]) -> None:
            # Done, failed or abandoned (a caller's timeout cancels it): drop the bookkeeping.
            self._task_futures.pop(task_id, None)
            self._task_nodes.pop(task_id, None)

        future.add_done_callback(forget)
        node.tasks.append({**task, "id": task_id})
        node.wake.set()
        return future

    # -- freeing --------------------------------------------------------------------------

    def _live(self, replica: Replica) -> NodeState | None:
        """The node holding ``replica`` if it is the registration it was allocated under."""
        node = self._nodes.get(replica.node)
        return node if node is not None and node.generation == replica.generation else None

    def _free(self, replica: Replica, size: int) -> None:
        node = self._live(replica)
        if node is None:
            return
        if replica.tier is Tier.DISK:
            node.disk_used -= aligned(size)
            node.tasks.append({"kind": "drop_disk", "id": 0, "file": replica.segment})
            node.wake.set()
            return
        alloc = node.segments.get(replica.segment)
        if alloc is not None:
            alloc.free(replica.offset, size)
            self._used -= aligned(size)

    def _free_all(self, replicas: list[Replica], size: int) -> None:
        if size:
            for r in replicas:
                self._free(r, size)

    def _retire(self, entry: Entry) -> None:
        """Free an entry's replicas; bytes under a read lease are freed when it ends."""
        self._under.discard(entry.key)
        entry.version += 1
        if not entry.size:
            return
        now = time.monotonic()
        if entry.lease_until > now:
            self.metrics.lease_waits.inc()
            entry.deferred = True
            for r in entry.replicas:
                self._deferred.append((entry.lease_until, r.node, r, entry.size, entry.lease_id))
        else:
            self._free_all(entry.replicas, entry.size)

    def _insert(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        self._object_bytes += entry.size

    def _discard(self, key: str) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._object_bytes -= entry.size
        return entry

    def _changed(self, entry: Entry) -> None:
        if self._log is None:
            return
        self._log.append({"op": "put", "key": entry.key, "entry": entry.to_record()})
        if self._log.records >= self.config.snapshot_every:
            self._log.snapshot({k: e.to_record() for k, e in self._entries.items()})

    # -- membership and background work ---------------------------------------------------

    def _declare_dead(self, name: str, *, reason: str) -> None:
        node = self._nodes.pop(name, None)
        if node is None:
            return
        self._used -= node.used
        self._membership_changed()
        self.metrics.node_deaths.inc()
        self.metrics.nodes.set(len(self._nodes))
        for seg in node.segments:
            self._segment_owner.pop(seg, None)
        lost = degraded = 0
        for entry in list(self._entries.values()):
            kept = [r for r in entry.replicas if r.node != name]
            if len(kept) == len(entry.replicas):
                continue
            entry.replicas = kept
            if entry.size and not kept:
                self._discard(entry.key)
                self._under.discard(entry.key)
                lost += 1
                if self._log is not None:
                    self._log.append({"op": "del", "key": entry.key})
                continue
            self._changed(entry)
            if len(entry.memory()) < entry.want:
                self._under.add(entry.key)
                degraded += 1
        self._deferred = [d for d in self._deferred if d[1] != name]
        # Its tasks, queued or running, will never report: fail them now.
        for task_id in [t for t, n in self._task_nodes.items() if n == name]:
            future = self._task_futures.pop(task_id, None)
            self._task_nodes.pop(task_id, None)
            if future is not None and not future.done():
                future.set_result({"ok": False, "error": f"node {name!r} died"})
        logger.warning(
            "node %r declared dead (%s): %d objects lost their last replica, %d under-replicated",
            name,
            reason,
            lost,
            degraded,
        )

    async def _reaper(self) -> None:
        period = min(0.25, self.config.heartbeat_timeout_s / 4)
        grace_done = not self._recovered_nodes
        gauges_at = 0.0
        while True:
            await asyncio.sleep(period)  # a periodic scan, not synchronisation
            now = time.monotonic()
            if now - gauges_at >= 1.0:  # usage gauges for scrapes: O(segments), once a second
                gauges_at = now
                self._usage()
            for node in list(self._nodes.values()):
                if now - node.last_seen > self.config.heartbeat_timeout_s:
                    self._declare_dead(
                        node.name,
                        reason=f"silent for more than {self.config.heartbeat_timeout_s:g} s",
                    )
            if not grace_done and now - self._started > 2 * self.config.heartbeat_timeout_s:
                grace_done = True
                for name in self._recovered_nodes - set(self._nodes):
                    self._nodes[name] = NodeState(name, "", {}, 0)
                    self._declare_dead(name, reason="did not re-register after master restart")
            for put_id, pending in list(self._pending.items()):
                if pending.deadline < now:
                    del self._pending[put_id]
                    self._free_all(pending.replicas, pending.size)
                    if pending.key:  # a put started ahead and not needed is no news
                        logger.warning("put %s of key %r expired uncommitted", put_id, pending.key)
            if self._deferred:
                due = [d for d in self._deferred if d[0] <= now]
                self._deferred = [d for d in self._deferred if d[0] > now]
                for _until, _node, replica, size, _lease in due:
                    self._free(replica, size)
            for lease_id, entry in list(self._leases.items()):
                if entry.lease_until <= now:  # ended by time: readers that never said so
                    del self._leases[lease_id]

    async def _rereplicator(self) -> None:
        running: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(0.1)  # a periodic scan, not synchronisation
            if not self.config.rereplicate:
                continue
            for key in list(self._under):
                if len(running) >= _REREPLICATE_PARALLEL:
                    break
                if key in self._rereplicating:
                    continue
                entry = self._entries.get(key)
                if entry is None:
                    self._under.discard(key)
                    continue
                sources = [r for r in entry.memory() if r.node in self._nodes]
                if not sources or len(sources) >= entry.want:
                    self._under.discard(key)
                    continue
                targets = self._place(entry.size, 1, None, exclude={r.node for r in entry.replicas})
                if not targets:
                    continue  # no other node has room now: try again later
                self._rereplicating.add(key)
                task = asyncio.create_task(self._copy(entry, sources[0], targets[0]))
                running.add(task)
                task.add_done_callback(running.discard)

    async def _copy(self, entry: Entry, source: Replica, target: Replica) -> None:
        version = entry.version
        try:
            node = self._nodes.get(target.node)
            if node is None:
                return
            future = self._task(
                node,
                {
                    "kind": "copy",
                    "src_segment": source.segment,
                    "src_offset": source.offset,
                    "dst_segment": target.segment,
                    "dst_offset": target.offset,
                    "length": entry.size,
                    "checksum_kind": str(entry.checksum_kind),
                },
            )
            try:
                result = await asyncio.wait_for(future, _TASK_TIMEOUT_S)
            except TimeoutError:
                result = {"ok": False, "error": "timed out"}
            current = self._entries.get(entry.key)
            good = (
                result.get("ok")
                and result.get("checksum") == entry.checksum
                and current is entry
                and entry.version == version
                and self._live(target) is not None
            )
            if not good:
                self._free(target, entry.size)
                logger.info("re-replication of %r abandoned: %s", entry.key, result.get("error"))
                return
            entry.replicas.append(target)
            self._changed(entry)
            self.metrics.rereplications.inc()
            if len(entry.memory()) >= entry.want:
                self._under.discard(entry.key)
        finally:
            self._rereplicating.discard(entry.key)


class _BusyPollSelector(selectors.DefaultSelector):
    """Polls without sleeping for ``busy_poll_s`` before it blocks in the kernel.

    A master that sleeps in epoll between requests is woken by each one: on the 2-core VM box
    that wake-up (and the cold caches after it) cost ~20 us of every round trip (asyncio echo
    server, client working 30 us between requests: p50 31-40 us sleeping, 9 us polling;
    issue 4). Polling stops after ``busy_poll_s`` of silence, so an idle master sleeps.
    """

    def __init__(self, busy_poll_s: float) -> None:
        super().__init__()
        self._busy_poll_s = busy_poll_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        now = time.perf_counter()
        spin = self._busy_poll_s if timeout is None else min(self._busy_poll_s, timeout)
        until = now + spin
        while now < until:
            os.sched_yield()  # a client on this CPU (2-core boxes) runs first
            ready = super().select(0)
            if ready:
                return ready
            now = time.perf_counter()
        return super().select(None if timeout is None else max(timeout - spin, 0.0))


def new_master_loop(config: MasterConfig) -> asyncio.AbstractEventLoop:
    """The master's event loop: busy-polling when ``config.busy_poll_s`` is set."""
    if config.busy_poll_s <= 0:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(_BusyPollSelector(config.busy_poll_s))


def run_master_in_thread(config: MasterConfig) -> tuple[Master, Callable[[], None]]:
    """Start a Master on its own thread and event loop; returns (master, stop)."""
    loop = new_master_loop(config)
    master = Master(config)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(master.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(master.close())
        loop.close()

    thread = threading.Thread(target=run, name="kvstack-store-master", daemon=True)
    thread.start()
    if not started.wait(30.0):
        raise StoreTimeout("embedded master start", timeout_s=30.0)
    if failure:
        raise StoreError(f"embedded master failed to start: {failure[0]!r}")

    def stop() -> None:
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)

    return master, stop
