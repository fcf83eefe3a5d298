"""Engine: registers this process's segments, serves them to peers and issues transfers."""

from __future__ import annotations

import itertools
import logging
import operator
import os
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from kvstack.transfer import _metrics, _native
from kvstack.transfer._batch import Batch, Pages, Route, Work
from kvstack.transfer._config import EngineConfig, parse_size
from kvstack.transfer._cuda import CudaTransport, ipc_descriptor
from kvstack.transfer._memory import (
    LocalSegment,
    host_id,
    is_alive,
    segment_from_buffer,
    shm_segment,
    sweep_stale_shm,
)
from kvstack.transfer._metadata import MetadataBackend, open_metadata
from kvstack.transfer._tcp import PagePlan, TcpServer, TcpTransport
from kvstack.transfer._transport import (
    LOCAL_OWNERS,
    LocalTransport,
    PageRoute,
    ShmTransport,
    Transport,
)
from kvstack.transfer._types import BufferItem, Op, SegmentInfo, TransferRequest
from kvstack.transfer.errors import (
    InvalidRequest,
    OutOfBounds,
    PeerUnavailable,
    ProtocolError,
    SegmentExists,
    SegmentNotFound,
    SegmentReadOnly,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
)

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

_MAX_NAME_CHARS = 255
_READ = Op.READ  # hot loops: skip the enum descriptor
_WRITE = Op.WRITE
# Remembered page routes per engine (a KV manager uses a handful of segment pairs).
_PAGE_ROUTES_MAX = 64
# Batches at least this long try the array path for KV-page handoffs (see _pages_fast_path).
_PAGES_MIN = 8
_LOCAL_OFFSET = operator.attrgetter("local_offset")
_REMOTE_OFFSET = operator.attrgetter("remote_offset")
_LENGTH = operator.attrgetter("length")
# How errors name the local side of read_into_tensor / write_tensor (a private buffer).
_TENSOR = "tensor"
_INT64_MAX = np.iinfo(np.int64).max
_INT64 = np.dtype(np.int64)  # the dtype of every native-order int64 array (one object)
_COLUMNS = ("local_offsets", "remote_offsets", "lengths")  # the rows of Pages.table
# Offsets and lengths of Engine.submit_pages: an integer array, or ints (converted once).
PageColumn = np.ndarray | Sequence[int]


def _page_column(name: str, values: object) -> np.ndarray:
    """``values`` as a numpy integer array (no copy if it is one); InvalidRequest says why not."""
    array = np.asarray(values)
    if not isinstance(values, np.ndarray) and array.size == 0:
        return np.empty(0, dtype=np.int64)  # [] is float64 to numpy
    if array.dtype.kind not in "iu":
        # Also Python ints past int64 in a list (numpy makes them float64 or object).
        raise InvalidRequest(f"{name} must be integers within int64, got {array.dtype} values")
    if array.ndim > 1 or (array.ndim == 0 and name != "lengths"):
        raise InvalidRequest(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype == np.uint64 and array.size and array.max() > _INT64_MAX:
        index = int(np.argmax(array.reshape(-1) > _INT64_MAX))
        raise InvalidRequest(f"request {index}: {name} is {array.reshape(-1)[index]}, past int64")
    return array


def _int64_column(values: object) -> np.ndarray | None:
    """``values`` itself if it is a 1-D C-contiguous int64 array, else None (attribute checks
    only: no numpy call)."""
    if (
        type(values) is np.ndarray
        and values.dtype is _INT64
        and values.ndim == 1
        and values.flags.c_contiguous
    ):
        return values
    return None


def _int64_columns(
    local_offsets: object, remote_offsets: object, lengths: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray | int] | None:
    """A page batch's columns as they are, if they are 1-D C-contiguous int64 arrays of one
    non-zero length (lengths may be one int); else None."""
    local_column = _int64_column(local_offsets)
    remote_column = _int64_column(remote_offsets)
    if local_column is None or remote_column is None:
        return None
    n = len(local_column)
    length_column = lengths if type(lengths) is int else _int64_column(lengths)
    if length_column is None or len(remote_column) != n or n == 0:
        return None
    if not isinstance(length_column, int) and len(length_column) != n:
        return None
    return local_column, remote_column, length_column


class _TcpPageRoute(NamedTuple):
    """transfer_pages WRITEs between two segments over tcp, remembered like shm's PageRoute:
    the next batches skip the lookups (Engine._fast_pages) and go straight to the wire."""

    info: SegmentInfo
    local: LocalSegment


class _FastPages(NamedTuple):
    """A page batch for Engine's native paths (see Engine._fast_pages)."""

    op: Op
    segment: LocalSegment
    info: SegmentInfo
    transport: str  # "shm" or "tcp"
    local_offsets: np.ndarray  # int64, C-contiguous, as the caller gave them
    remote_offsets: np.ndarray
    lengths: np.ndarray | int


def _page_table(local_offsets: object, remote_offsets: object, lengths: object) -> np.ndarray:
    """The columns of Engine.submit_pages as a new int64 [3, n] array (``Pages.table``).

    Our own copy: tcp frames still point into it after submit returns. InvalidRequest names
    the bad column and, for a bad value, the first request that has one.
    """
    columns = [
        _page_column(name, values)
        for name, values in zip(_COLUMNS, (local_offsets, remote_offsets, lengths), strict=True)
    ]
    n = len(columns[0])
    if len(columns[1]) != n or (columns[2].ndim and len(columns[2]) != n):
        sizes = ", ".join(
            f"{name} {column.size}" for name, column in zip(_COLUMNS, columns, strict=True)
        )
        raise InvalidRequest(f"one entry per request in each array, got {sizes}")
    table = np.empty((3, n), dtype=np.int64)
    table[0], table[1], table[2] = columns  # a scalar length fills its row
    if n and table.min() < 0:
        index = int(np.argmax((table < 0).any(axis=0)))
        row = int(np.argmax(table[:, index] < 0))
        raise InvalidRequest(
            f"request {index}: {_COLUMNS[row]} must be >= 0, got {table[row, index]}"
        )
    return table


def _pages_error(pages: Pages) -> TransferError | None:
    """The error of a page batch that no byte may move for: a read-only side, or the first
    request outside either segment (its local side named first), else None.
    """
    local, info, op, table = pages.local, pages.route.remote, pages.op, pages.table
    if op is _READ and local.readonly:
        return SegmentReadOnly(local.name)
    if op is not _READ and info.readonly:
        return SegmentReadOnly(info.name, peer=info.peer)
    if not table.shape[1]:
        return None
    # One reduction decides the usual case: the largest offset plus the largest length fits.
    local_max, remote_max, length_max = table.max(axis=1).tolist()
    if local_max + length_max <= local.size_bytes and remote_max + length_max <= info.size_bytes:
        return None
    # No overflow (all values are 0..2**63-1): offset + length > size <=> offset > size - length
    lengths = pages.lengths
    local_bad = pages.local_offsets > local.size_bytes - lengths
    remote_bad = pages.remote_offsets > info.size_bytes - lengths
    bad = local_bad | remote_bad
    if not bad.any():
        return None
    index = int(bad.argmax())
    length = int(lengths[index])
    if local_bad[index]:
        offset = int(pages.local_offsets[index])
        return OutOfBounds(
            local.name,
            offset=offset,
            length=length,
            size_bytes=local.size_bytes,
            op=op.value,
            index=index,
        )
    offset = int(pages.remote_offsets[index])
    return OutOfBounds(
        info.name,
        offset=offset,
        length=length,
        size_bytes=info.size_bytes,
        op=op.value,
        peer=info.peer,
        index=index,
    )


def _unlink_all(segments: dict[str, LocalSegment]) -> None:
    # At interpreter exit (or GC of a forgotten Engine): leave no /dev/shm files behind.
    for segment in list(segments.values()):
        if segment.shm is not None:
            segment.shm.unlink()


class Engine:
    """One per process: owns segments, serves peers over tcp, and moves bytes in batches.

    Thread-safe: any thread may register, submit and wait. Close it (or use ``with``) to
    unregister its segments; a killed process's segments vanish by pid check (same host) or
    metadata TTL (other hosts).
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.id = uuid.uuid4().hex
        self._host_id = host_id()
        self._segments: dict[str, LocalSegment] = {}
        self._published: dict[str, SegmentInfo] = {}
        self._cache: dict[str, SegmentInfo] = {}
        # (local, remote, transport, op) -> the shm route of the last transfer_pages between them
        self._page_routes: dict[tuple[str, str, str | None, Op], PageRoute | _TcpPageRoute] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._metadata: MetadataBackend = open_metadata(
            self.config.metadata_url,
            token=self.config.token,
            timeout_s=self.config.connect_timeout_s,
        )
        if "shm" in self.config.transports:
            sweep_stale_shm()
        self._server = TcpServer(
            host=self.config.host,
            port=self.config.tcp_port,
            token=self.config.token,
            owner=self.id,
            lookup=self._served,
        )
        self.address = self._server.address
        self._tcp = TcpTransport(
            token=self.config.token,
            connections=self.config.tcp_connections,
            stripe_bytes=self.config.tcp_stripe_bytes,
            connect_timeout_s=self.config.connect_timeout_s,
        )
        self._shm = ShmTransport()
        self._cuda = CudaTransport()
        self._transports: dict[str, Transport] = {
            "local": LocalTransport(),
            "cuda": self._cuda,
            "shm": self._shm,
            "tcp": self._tcp,
        }
        self.metrics_port: int | None = None
        if self.config.metrics_port is not None:
            self.metrics_port = _metrics.start_exporter(self.config.metrics_port)
        LOCAL_OWNERS[self.id] = self._segments
        self._finalizer = weakref.finalize(self, _unlink_all, self._segments)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop,
            name=f"kvstack-transfer-heartbeat-{self.address}",
            daemon=True,
        )
        self._heartbeat.start()
        logger.info(
            "engine %s serving on %s (metadata %s)", self.id, self.address, self._metadata.url
        )

    def __repr__(self) -> str:
        return f"<Engine {self.id[:8]} at {self.address}, {len(self._segments)} segments>"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- segments -----------------------------------------------------------------------

    def register(self, name: str, buffer: object, *, readonly: bool = False) -> SegmentInfo:
        """Publish ``buffer`` (bytes-like, numpy array, CPU/CUDA torch tensor) as ``name``.

        No copy is made: peers read and write the buffer's own memory, which must outlive the
        registration. ``readonly`` refuses peers' WRITEs. Raises SegmentExists, InvalidRequest.
        """
        segment = segment_from_buffer(self._check_name(name), buffer)
        if readonly:
            segment.readonly = True
        return self._publish(segment)

    def allocate(self, name: str, size_bytes: int | str, *, prefault: bool = False) -> np.ndarray:
        """Allocate a shared-memory segment (zeroed) and return it as a uint8 array.

        Peers on this host map it directly (the ``shm`` transport); others use tcp. Memory is
        taken as pages are first touched, unless ``prefault``: then it is all allocated now
        (a store node's contribution), and peers that map it map every page at once instead
        of faulting on each first touch.
        """
        size = parse_size(size_bytes)
        segment = shm_segment(self._check_name(name), size, prefault=prefault)
        try:
            self._publish(segment)
        except BaseException:
            segment.close()
            raise
        if segment.host is None:
            raise InvalidRequest(f"segment {name!r} has no host memory")
        return segment.host

    def unregister(self, name: str) -> None:
        """Withdraw a segment; peers' later requests on it fail with SegmentNotFound."""
        with self._lock:
            segment = self._segments.pop(name, None)
            info = self._published.pop(name, None)
        if segment is None:
            raise SegmentNotFound(name, peer=self.address)
        self._forget_page_routes(local=name)
        self._server.segment_withdrawn()
        if info is not None:
            try:
                self._metadata.delete(name, owner=self.id)
            except TransferError as exc:
                logger.warning("could not unregister %r from metadata: %s", name, exc)
        segment.close()
        logger.info("segment %r unregistered", name)

    def segments(self) -> list[SegmentInfo]:
        """Records of this engine's published segments."""
        with self._lock:
            return list(self._published.values())

    def array(self, name: str) -> np.ndarray:
        """The host memory of local segment ``name`` as a uint8 array (no copy)."""
        segment = self._local(name)
        if segment.host is None:
            raise InvalidRequest(f"segment {name!r} is on {segment.device}, not host memory")
        return segment.host

    def lookup(self, name: str) -> SegmentInfo:
        """Resolve any live segment (cached); raises SegmentNotFound or MetadataError."""
        info = self._cache.get(name)
        if info is not None:
            return info
        info = self._metadata.get(name)
        if info.host_id == self._host_id and not is_alive(info.pid):
            # Its owner was killed before it could unregister: clean up on its behalf.
            self._metadata.delete(name, owner=info.owner)
            raise SegmentNotFound(name)
        self._cache[name] = info
        return info

    def map_segment(self, name: str) -> np.ndarray | None:
        """Zero-copy access to a same-host segment: the shm transport's own mapping of it.

        For small copies where a batch's bookkeeping costs more than the memcpy (a 4 KiB store
        get). Checked as a transfer is: the owner process is alive and the file is the one it
        registered. None when the segment is not reachable this way (another host, CUDA, not
        shareable, shm disabled, gone); use ``submit`` then, which names the precise error.
        Read-only segments map read-only. The caller bounds-checks, and must not keep the array
        past the copy it makes (the owner may withdraw the segment).
        """
        if "shm" not in self.config.transports:
            return None
        try:
            info = self.lookup(name)
            if (
                info.host_id != self._host_id
                or info.device != "cpu"
                or info.shm_name is None
                or not is_alive(info.pid)
            ):
                return None
            return self._shm.region(info).array
        except TransferError:
            return None

    def wait_for(self, name: str, *, timeout_s: float) -> SegmentInfo:
        """Wait until some peer registers ``name``; raises SegmentNotFound after timeout_s."""
        try:
            return self.lookup(name)
        except SegmentNotFound:
            self._metadata.watch(name, timeout_s=timeout_s)
            return self.lookup(name)

    def _check_name(self, name: str) -> str:
        if self._closed:
            raise TransferError("engine is closed")
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME_CHARS:
            raise InvalidRequest(
                f"segment name must be 1..{_MAX_NAME_CHARS} characters, got {name!r}"
            )
        return name

    def _publish(self, segment: LocalSegment) -> SegmentInfo:
        name = segment.name
        cuda = ipc_descriptor(segment.cuda) if segment.cuda is not None else None
        info = SegmentInfo(
            name=name,
            size_bytes=segment.size_bytes,
            owner=self.id,
            host_id=self._host_id,
            pid=os.getpid(),
            tcp_address=self.address,
            device=segment.device,
            readonly=segment.readonly,
            shm_name=segment.shm.name if segment.shm is not None else None,
            cuda_ipc=cuda,
        )
        segment.published = True  # before the metadata names it: peers may come at once
        with self._lock:
            if name in self._segments:
                raise SegmentExists(name, peer=self.address)
            self._segments[name] = segment
        try:
            try:
                self._metadata.put(info, ttl_s=self.config.metadata_ttl_s)
            except SegmentExists:
                old = self._metadata.get(name)
                if old.host_id != self._host_id or is_alive(old.pid):
                    raise
                logger.info("taking over segment %r from dead process %d", name, old.pid)
                self._metadata.put(info, ttl_s=self.config.metadata_ttl_s, replace=True)
        except BaseException:
            with self._lock:
                self._segments.pop(name, None)
            self._server.segment_withdrawn()
            raise
        with self._lock:
            self._published[name] = info
        logger.info("segment %r registered (%d bytes, %s)", name, info.size_bytes, info.device)
        return info

    def _served(self, name: str) -> LocalSegment | None:
        # Peers reach published segments only, never a tensor helper's private one.
        segment = self._segments.get(name)
        return segment if segment is not None and segment.published else None

    def _local(self, name: str) -> LocalSegment:
        segment = self._segments.get(name)
        if segment is None:
            raise SegmentNotFound(name, peer=self.address)
        return segment

    def _heartbeat_loop(self) -> None:
        interval = self.config.metadata_ttl_s / 3
        while not self._stop.wait(interval):
            with self._lock:
                infos = list(self._published.values())
            for info in infos:
                try:
                    self._metadata.put(info, ttl_s=self.config.metadata_ttl_s)
                except TransferError as exc:
                    logger.warning("heartbeat for segment %r failed: %s", info.name, exc)

    # -- transfers ----------------------------------------------------------------------

    def submit(self, requests: Sequence[TransferRequest], *, transport: str | None = None) -> Batch:
        """Start a batch; returns at once for shm (already copied) or once tcp frames are queued.

        ``transport`` forces one transport ("shm", "tcp", "cuda", "local") for every request.
        Invalid requests fail in the batch (see ``Batch.failures()``); this raises only if the
        engine is closed.
        """
        return self._submit(requests, transport=transport, sync=False)

    def _submit(
        self,
        requests: Sequence[TransferRequest],
        *,
        transport: str | None,
        sync: bool,
        buffers: Sequence[LocalSegment] | None = None,
    ) -> Batch:
        # sync: the caller waits for the batch at once (read/write helpers), see TcpTransport.call.
        # buffers: the private local side of request i (submit_buffers), instead of the segment
        # the request names; they are never in self._segments, so peers cannot reach them.
        if self._closed:
            raise TransferError("engine is closed")
        batch = Batch(
            requests, default_timeout_s=self.config.request_timeout_s, on_error=self._on_error
        )
        if buffers is not None:
            batch._keepalive = buffers  # the caller's memory outlives every copy into it
            if len(batch.requests) > 1 and self._buffers_fast_path(batch, buffers, transport):
                return batch
        elif len(batch.requests) >= _PAGES_MIN and self._pages_fast_path(batch, transport):
            return batch
        groups: dict[str, list[Work]] = {}
        # Per-batch memo: a KV handoff names the same two segments hundreds of times.
        # Keyed by (name, is-READ): hashing the Op enum would run Python code per request.
        routes: dict[tuple[str, bool], tuple[Route, list[Work]]] = {}
        segments = self._segments
        works = batch._works
        for index, request in enumerate(batch.requests):
            try:
                if not isinstance(request, TransferRequest):
                    raise InvalidRequest(
                        f"request {index} is a {type(request).__name__}, not a TransferRequest"
                    )
                local = segments.get(request.local) if buffers is None else buffers[index]
                if local is None:
                    raise SegmentNotFound(request.local, peer=self.address)
                if request.local_offset + request.length > local.size_bytes or (
                    local.readonly and request.op is _READ
                ):
                    local.check(  # raises the precise error
                        request.local_offset,
                        request.length,
                        op=request.op.value,
                        writing=request.op is _READ,
                    )
                key = (request.remote, request.op is _READ)
                memo = routes.get(key)
                if memo is None:
                    info = self.lookup(request.remote)
                    chosen = self._pick(info, transport).name
                    route = Route(info, chosen, request.op.value)
                    batch._routes.append(route)
                    memo = (route, groups.setdefault(chosen, []))
                    routes[key] = memo
            except TransferError as exc:
                batch._fail(index, exc)
                continue
            route, group = memo
            route.totals[0] += 1
            route.totals[1] += request.length
            if request.timeout_s is not None:
                batch._timeouts[index] = request.timeout_s
            work = works[index] = Work(batch, index, request, local, route)
            group.append(work)
        for name, works in groups.items():
            if sync and name == "tcp":
                self._tcp.call(works)  # the caller waits anyway: let it read its own reply
            else:
                self._transports[name].submit(works)
        return batch

    def _pages_fast_path(self, batch: Batch, transport: str | None) -> bool:
        """A KV handoff given as TransferRequests: many requests, one local host and one remote
        segment, one op. Turned into the arrays of ``submit_pages`` and moved the same way;
        False (nothing done) sends the batch down the general path, which fails each bad
        request with its own error.
        """
        requests = batch.requests
        first = requests[0]
        if not isinstance(first, TransferRequest):
            return False
        local_name, remote_name, op = first.local, first.remote, first.op
        for r in requests:
            if (
                r.__class__ is not TransferRequest
                or r.local != local_name
                or r.remote != remote_name
                or r.op is not op
                or r.timeout_s is not None
            ):
                return False
        local = self._segments.get(local_name)
        if local is None:
            return False
        try:
            info = self.lookup(remote_name)
            chosen = self._pick(info, transport)
        except TransferError:
            return False
        n = len(requests)
        columns = itertools.chain(
            map(_LOCAL_OFFSET, requests), map(_REMOTE_OFFSET, requests), map(_LENGTH, requests)
        )
        try:
            # map(attrgetter) runs no bytecode per request: 26 vs 38 us for 256 (2-core box).
            table = np.fromiter(columns, np.int64, 3 * n).reshape(3, n)
        except OverflowError:  # offsets past 2**63: certainly out of bounds, let the checks say so
            return False
        pages = Pages(Route(info, chosen.name, op.value), local, op, table)
        if not self._takes_pages(pages) or _pages_error(pages) is not None:
            return False
        batch._pages = pages
        self._start_pages(batch, pages)
        return True

    def _takes_pages(self, pages: Pages) -> bool:
        """Whether the array path can move ``pages`` (else the per-request path does)."""
        transport = pages.route.transport
        if pages.local.host is None or transport not in ("shm", "tcp"):
            return False
        lengths = pages.lengths
        return not (
            transport == "tcp" and len(lengths) and lengths.max() > self._tcp.page_max_bytes
        )

    def _start_pages(self, batch: Batch, pages: Pages) -> None:
        """Hand checked pages to shm (copied now) or tcp (vectored frames); a failure before any
        byte moved (owner gone, peer unreachable) fails every request of the batch with it.
        """
        route = pages.route
        route.totals = [len(pages.lengths), int(pages.lengths.sum())]
        batch._routes.append(route)
        try:
            if route.transport == "shm":
                self._shm.copy_pages(pages)
                batch._done_all()
            else:
                self._tcp.submit_pages(batch, pages)
        except TransferError as exc:
            batch._fail_range(0, len(batch), exc)

    def _buffers_fast_path(
        self, batch: Batch, buffers: Sequence[LocalSegment], transport: str | None
    ) -> bool:
        """Caller buffers to or from one remote segment over shm: checked, then one memcpy_many
        (shared with the copy threads when large) and no per-request objects. False (nothing
        done) sends the batch down the general path, which names each bad request precisely.
        """
        requests = batch.requests
        first = requests[0]
        remote_name, op = first.remote, first.op
        for r in requests:
            if r.remote != remote_name or r.timeout_s is not None:
                return False
        for segment in buffers:
            if segment.host is None:
                return False
        try:
            info = self.lookup(remote_name)
            chosen = self._pick(info, transport)
        except TransferError:
            return False
        if chosen is not self._shm or (op is not _READ and info.readonly):
            return False
        size = info.size_bytes
        total = 0
        for r in requests:
            if r.remote_offset + r.length > size:
                return False
            total += r.length
        route = Route(info, chosen.name, op.value)
        route.totals = [len(requests), total]
        if not self._shm.copy_ranges(
            info,
            reading=op is _READ,
            local_addresses=[segment.address for segment in buffers],
            remote_offsets=[r.remote_offset for r in requests],
            lengths=[r.length for r in requests],
        ):
            return False
        batch._routes.append(route)
        batch._done_all()
        return True

    def _pick(self, info: SegmentInfo, forced: str | None) -> Transport:
        names = (forced,) if forced else self.config.transports
        for name in names:
            chosen = self._transports.get(name)
            if chosen is not None and chosen.can_reach(info):
                return chosen
        raise TransportUnavailable(
            f"no transport of {list(names)} can reach segment {info.name!r} ({info.device})",
            peer=info.peer,
        )

    def _on_error(self, remote: str, error: TransferError) -> None:
        # The owner may have restarted, withdrawn or re-registered (resized) the segment:
        # resolve it afresh next time.
        if isinstance(error, SegmentNotFound | PeerUnavailable | ProtocolError | OutOfBounds):
            self._cache.pop(remote, None)
            self._forget_page_routes(remote=remote)

    def _forget_page_routes(self, *, local: str | None = None, remote: str | None = None) -> None:
        # A route keeps its segments' memory mapped: drop those of a withdrawn or stale one.
        self._page_routes = {
            key: route
            for key, route in self._page_routes.items()
            if key[0] != local and key[1] != remote
        }

    def transfer(
        self, requests: Sequence[TransferRequest], *, transport: str | None = None
    ) -> None:
        """Submit, wait, and raise BatchFailed naming every failed request, if any."""
        batch = self.submit(requests, transport=transport)
        batch._wait(None)
        batch.raise_for_errors()

    # -- page batches as arrays ----------------------------------------------------------

    def _check_pages_call(self, op: Op, timeout_s: float | None) -> None:
        if self._closed:
            raise TransferError("engine is closed")
        if not isinstance(op, Op):
            raise InvalidRequest(f"op must be Op.READ or Op.WRITE, got {op!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidRequest(f"timeout_s must be > 0, got {timeout_s!r}")

    def _fast_pages(
        self,
        op: Op,
        local: str,
        remote: str,
        *,
        local_offsets: object,
        remote_offsets: object,
        lengths: object,
        transport: str | None,
    ) -> _FastPages | None:
        """A page batch the native library checks and moves (shm) or lays out (tcp) in one
        call: its columns are int64 arrays already (what a KV-cache manager keeps), between a
        local host segment and a remote one it may use that way. Attribute checks only.

        None sends the batch down the general path, which also says what is wrong. Right
        after a big copy has flushed the caches, each numpy call of that path cost 5-10 us on
        the H200 machine: half the time of a 4 MiB batch went there (issue #3).
        """
        columns = _int64_columns(local_offsets, remote_offsets, lengths)
        if columns is None:
            return None
        local_column, remote_column, length_column = columns
        segment = self._segments.get(local)
        if segment is None or segment.host is None or _native.load() is None:
            return None
        try:
            info = self.lookup(remote)
            chosen = self._pick(info, transport)
        except TransferError:
            return None
        if chosen.name not in ("shm", "tcp") or (
            segment.readonly if op is _READ else info.readonly
        ):
            return None
        return _FastPages(
            op, segment, info, chosen.name, local_column, remote_column, length_column
        )

    def _copy_pages_now(self, fast: _FastPages, table: np.ndarray | None) -> bool:
        """Check and copy a fast page batch over shm in one native call, metrics recorded;
        ``table`` (int64 [3, n]) receives its columns. False when nothing was done."""
        started = time.monotonic()
        copied = self._shm.copy_page_columns(
            fast.info,
            fast.segment,
            reading=fast.op is _READ,
            local_offsets=fast.local_offsets,
            remote_offsets=fast.remote_offsets,
            lengths=fast.lengths,
            table=table,
        )
        if copied is None:
            return False
        _metrics.record_done(
            "shm",
            fast.info.peer,
            fast.op.value,
            count=len(fast.local_offsets),
            length=copied,
            seconds=time.monotonic() - started,
        )
        return True

    def _write_pages_waited(
        self,
        segment: LocalSegment,
        info: SegmentInfo,
        columns: tuple[np.ndarray, np.ndarray, np.ndarray | int],
        timeout_s: float | None,
    ) -> bool:
        """A page WRITE over tcp whose caller waits, sent and waited for in
        TcpTransport.write_pages, without a Batch unless some request failed: then BatchFailed
        names each. False when nothing was sent (the batch goes the usual way)."""
        local_offsets, remote_offsets, lengths = columns
        started = time.monotonic()
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        n = len(local_offsets)
        total = n * lengths if isinstance(lengths, int) else int(lengths.sum())
        try:
            outcome = self._tcp.write_pages(
                info,
                segment,
                local_offsets=local_offsets,
                remote_offsets=remote_offsets,
                lengths=lengths,
                total=total,
                deadline=started + timeout,
            )
        except TransferError as exc:  # no connection to the peer: nothing was sent
            outcome = [(0, n, exc)]
        if outcome is None:
            return False
        if all(error is None for _, _, error in outcome):
            _metrics.record_done(
                "tcp",
                info.peer,
                _WRITE.value,
                count=n,
                length=total,
                seconds=time.monotonic() - started,
            )
            return True
        # Some failed: a Batch over the same pages names each failed request.
        table = np.empty((3, n), np.int64)
        table[0], table[1], table[2] = local_offsets, remote_offsets, lengths
        route = Route(info, "tcp", _WRITE.value)
        route.totals = [n, total]
        batch = Batch(
            pages=Pages(route, segment, _WRITE, table, timeout_s),
            default_timeout_s=timeout,
            on_error=self._on_error,
        )
        batch._started = started  # its deadlines are the ones the frames had
        batch._routes.append(route)
        expired = False
        for start, stop, error in outcome:
            if error is None:
                batch._done_range(start, stop)
            elif isinstance(error, TransferTimeout):
                expired = True  # named per request below
            else:
                batch._fail_range(start, stop, error)
        if expired:
            batch._expire()
        batch._wait(None)
        batch.raise_for_errors()
        return True

    def _send_pages_now(self, fast: _FastPages, timeout_s: float | None) -> Batch | None:
        """Check a fast page batch and lay out its tcp frames in one native call, then send
        them. None when nothing was done (a bad request, or pages over page_max_bytes)."""
        native = _native.load()
        assert native is not None  # _fast_pages checked
        segment = fast.segment
        planned = native.plan_pages(
            fast.local_offsets,
            fast.remote_offsets,
            fast.lengths,
            local=(segment.address, segment.size_bytes),
            remote_size=fast.info.size_bytes,
            max_length=self._tcp.page_max_bytes,
        )
        if isinstance(planned, int):
            return None
        table, wire, addresses, total = planned
        route = Route(fast.info, "tcp", fast.op.value)
        route.totals = [len(fast.local_offsets), total]
        pages = Pages(route, segment, fast.op, table, timeout_s)
        batch = Batch(
            pages=pages,
            default_timeout_s=self.config.request_timeout_s if timeout_s is None else timeout_s,
            on_error=self._on_error,
        )
        batch._routes.append(route)
        uniform = fast.lengths if isinstance(fast.lengths, int) else 0
        try:
            self._tcp.submit_pages(batch, pages, PagePlan(wire, addresses, total, uniform))
        except TransferError as exc:
            batch._fail_range(0, len(batch), exc)
        return batch

    def submit_pages(
        self,
        op: Op,
        local: str,
        remote: str,
        *,
        local_offsets: PageColumn,
        remote_offsets: PageColumn,
        lengths: int | PageColumn,
        transport: str | None = None,
        timeout_s: float | None = None,
    ) -> Batch:
        """Start ONE batch of request i = ``op`` of ``lengths[i]`` bytes between offset
        ``local_offsets[i]`` of local segment ``local`` and ``remote_offsets[i]`` of segment
        ``remote`` (a KV-page handoff), with no Python object per request.

        Offsets and lengths are integer numpy arrays or sequences of ints (copied once into
        int64 arrays: the caller may reuse its own at once); ``lengths`` may be one int for
        every request. ``timeout_s`` is every request's deadline (default: the engine's).

        Everything that can be checked before a byte moves is, and raises: InvalidRequest
        (not Op, not 1-D integers, arrays of different lengths, a negative value; the message
        names the first bad request), SegmentNotFound (either segment), SegmentReadOnly (READ
        into a read-only local segment, WRITE into a read-only remote one), OutOfBounds (the
        first request outside either segment, as ``.index``), TransportUnavailable (and
        MetadataError if the metadata service fails looking ``remote`` up). A peer
        that fails later (gone, unreachable, killed mid-batch, past the deadline) fails the
        requests it carried in the batch, as in ``submit``. Over shm and tcp the batch builds
        its TransferRequests only if asked (``requests``, ``wait``, ``outcomes``); other
        transports, and tcp pages over ``TcpTransport.page_max_bytes``, go per request.
        """
        self._check_pages_call(op, timeout_s)
        fast = self._fast_pages(
            op,
            local,
            remote,
            local_offsets=local_offsets,
            remote_offsets=remote_offsets,
            lengths=lengths,
            transport=transport,
        )
        if fast is not None and fast.transport == "shm":
            table = np.empty((3, len(fast.local_offsets)), dtype=np.int64)
            if self._copy_pages_now(fast, table):
                batch = Batch(
                    pages=Pages(
                        Route(fast.info, "shm", op.value), fast.segment, op, table, timeout_s
                    ),
                    default_timeout_s=(
                        self.config.request_timeout_s if timeout_s is None else timeout_s
                    ),
                    on_error=self._on_error,
                )
                batch._done_all()  # no routes: _copy_pages_now recorded the metrics
                return batch
        elif fast is not None:
            sent = self._send_pages_now(fast, timeout_s)
            if sent is not None:
                return sent
        return self._submit_pages_general(
            op,
            local,
            remote,
            local_offsets=local_offsets,
            remote_offsets=remote_offsets,
            lengths=lengths,
            transport=transport,
            timeout_s=timeout_s,
        )

    def _submit_pages_general(
        self,
        op: Op,
        local: str,
        remote: str,
        *,
        local_offsets: object,
        remote_offsets: object,
        lengths: object,
        transport: str | None,
        timeout_s: float | None,
    ) -> Batch:
        """submit_pages for any columns and transport; raises the precise error of bad input."""
        table = _page_table(local_offsets, remote_offsets, lengths)
        segment = self._segments.get(local)
        if segment is None:
            raise SegmentNotFound(local, peer=self.address)
        info = self.lookup(remote)
        chosen = self._pick(info, transport)
        pages = Pages(Route(info, chosen.name, op.value), segment, op, table, timeout_s)
        error = _pages_error(pages)
        if error is not None:
            raise error
        if not self._takes_pages(pages):
            return self._submit(pages.requests(), transport=chosen.name, sync=False)
        batch = Batch(
            pages=pages,
            default_timeout_s=self.config.request_timeout_s if timeout_s is None else timeout_s,
            on_error=self._on_error,
        )
        if len(batch):
            self._start_pages(batch, pages)
        return batch

    def transfer_pages(
        self,
        op: Op,
        local: str,
        remote: str,
        *,
        local_offsets: PageColumn,
        remote_offsets: PageColumn,
        lengths: int | PageColumn,
        transport: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """``submit_pages``, wait, and raise BatchFailed naming every failed request, if any."""
        # A remembered route first, before any other Python: right after a big copy every step
        # is slow (issue #3). Only a valid op and an open engine ever have one (see close).
        key = (local, remote, transport, op)
        route = self._page_routes.get(key)
        if route is not None and (timeout_s is None or timeout_s > 0):
            if (
                self._segments.get(local) is not route.local
                or self._cache.get(remote) is not route.info
            ):
                self._page_routes.pop(key, None)  # a segment withdrawn or looked up afresh since
            elif isinstance(route, _TcpPageRoute):
                columns = _int64_columns(local_offsets, remote_offsets, lengths)
                if columns is not None and self._write_pages_waited(
                    route.local, route.info, columns, timeout_s
                ):
                    return
            else:
                started = time.monotonic()
                try:
                    copied = route.copy(local_offsets, remote_offsets, lengths)
                except ValueError:  # columns it cannot take: the usual path converts them
                    copied = 0
                if copied > 0:
                    _metrics.record_done(
                        "shm",
                        route.info.peer,
                        route.op,
                        count=len(local_offsets),
                        length=copied,
                        seconds=time.monotonic() - started,
                    )
                    return
                if copied < 0:  # the owner gone or replaced, a bad request: not again
                    self._page_routes.pop(key, None)
        self._check_pages_call(op, timeout_s)
        fast = self._fast_pages(
            op,
            local,
            remote,
            local_offsets=local_offsets,
            remote_offsets=remote_offsets,
            lengths=lengths,
            transport=transport,
        )
        if fast is not None and fast.transport == "shm":
            if self._copy_pages_now(fast, None):
                if len(self._page_routes) < _PAGE_ROUTES_MAX:
                    route = self._shm.page_route(fast.info, fast.segment, reading=op is _READ)
                    if route is not None:
                        self._page_routes[key] = route
                return  # no Batch to build: nothing can fail any more
        elif fast is not None:
            columns = (fast.local_offsets, fast.remote_offsets, fast.lengths)
            if op is not _READ and self._write_pages_waited(
                fast.segment, fast.info, columns, timeout_s
            ):
                if len(self._page_routes) < _PAGE_ROUTES_MAX:
                    self._page_routes[key] = _TcpPageRoute(fast.info, fast.segment)
                return
            batch = self._send_pages_now(fast, timeout_s)
            if batch is not None:
                batch._wait(None)
                batch.raise_for_errors()
                return
        batch = self._submit_pages_general(
            op,
            local,
            remote,
            local_offsets=local_offsets,
            remote_offsets=remote_offsets,
            lengths=lengths,
            transport=transport,
            timeout_s=timeout_s,
        )
        batch._wait(None)
        batch.raise_for_errors()

    def _one(self, request: TransferRequest, transport: str | None) -> None:
        # A segment already looked up takes _cuda_one or _tcp_one where they apply; the first
        # request to it (and every other) the general path, which caches the lookup.
        info = self._cache.get(request.remote)
        if info is not None:
            local = self._segments.get(request.local)
            if local is not None:
                if info.cuda_ipc is not None:
                    if self._cuda_one(request, info, local, transport):
                        return
                elif self._tcp_one(request, info, local, transport):
                    return
        batch = self._submit([request], transport=transport, sync=True)
        batch._wait(None)
        error = batch._errors[0]
        if error is not None:
            raise error

    def _goes_direct(
        self,
        request: TransferRequest,
        info: SegmentInfo,
        local: LocalSegment,
        transport: str | None,
        direct: Transport,
    ) -> bool:
        """Whether a one-off request may skip the Batch on ``direct`` (_tcp_one, _cuda_one): the
        engine open, ``direct`` the transport it would take, the request inside both segments
        and allowed by them. Otherwise the general path moves it or raises its precise error."""
        if self._closed:
            return False
        try:
            if self._pick(info, transport) is not direct:
                return False
        except TransferError:
            return False
        length = request.length
        reading = request.op is _READ
        return not (
            request.remote_offset + length > info.size_bytes
            or request.local_offset + length > local.size_bytes
            or (reading and local.readonly)
            or (not reading and info.readonly)
        )

    def _tcp_one(
        self,
        request: TransferRequest,
        info: SegmentInfo,
        local: LocalSegment,
        transport: str | None,
    ) -> bool:
        """A small request between host memory and a segment reached over tcp, sent on this
        thread's lane without a Batch: the general path's Python around a 4 KiB request
        (Batch, Work, route) cost as much as the round trip itself on the GPU machines (issue
        #3's 60 us row). ``info``: the remote segment's cached record. False (nothing done)
        when the request goes elsewhere or fails a check: the general path then moves it or
        raises its precise error."""
        op, length = request.op, request.length
        if not self._tcp.fits_lane(length, local) or not self._goes_direct(
            request, info, local, transport, self._tcp
        ):
            return False
        timeout_s = (
            self.config.request_timeout_s if request.timeout_s is None else request.timeout_s
        )
        started = time.monotonic()
        error = self._tcp.lane_call(
            info,
            op,
            remote=request.remote,
            remote_offset=request.remote_offset,
            local=local,
            local_offset=request.local_offset,
            length=length,
            deadline=started + timeout_s,
            timeout_s=timeout_s,
        )
        if error is not None:
            _metrics.record_error("tcp", info.peer, type(error).__name__)
            self._on_error(request.remote, error)
            raise error
        _metrics.record_done(
            "tcp", info.peer, op.value, count=1, length=length, seconds=time.monotonic() - started
        )
        return True

    def _cuda_one(
        self,
        request: TransferRequest,
        info: SegmentInfo,
        local: LocalSegment,
        transport: str | None,
    ) -> bool:
        """One request to or from another process's CUDA segment, copied here without a
        Batch: a 1 GiB copy on an H100 takes ~750 us, and the general path's Python around
        it (Batch, Work, route, slicing) took ~110 us of that again (issue #3's cuda row).
        ``info``: the remote segment's cached record. False (nothing done) when the request
        goes elsewhere or fails a check: the general path then moves it or raises its precise
        error."""
        if not self._goes_direct(request, info, local, transport, self._cuda):
            return False
        op, length = request.op, request.length
        reading = op is _READ
        started = time.monotonic()
        region = (  # slicing a tensor costs several us of Python: not for the whole segment
            local.cuda
            if local.cuda is not None and request.local_offset == 0 and length == local.size_bytes
            else local.region(request.local_offset, length, op=op.value, writing=reading)
        )
        try:
            self._cuda.copy(info, region, request.remote_offset, reading=reading)
        except TransferError as exc:
            _metrics.record_error("cuda", info.peer, type(exc).__name__)
            self._on_error(request.remote, exc)
            raise
        _metrics.record_done(
            "cuda", info.peer, op.value, count=1, length=length, seconds=time.monotonic() - started
        )
        return True

    def read(
        self,
        local: str,
        remote: str,
        length: int,
        *,
        local_offset: int = 0,
        remote_offset: int = 0,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> None:
        """Copy ``length`` bytes of segment ``remote`` into local ``local``; raises its error."""
        request = TransferRequest(
            Op.READ, local, local_offset, remote, remote_offset, length, timeout_s
        )
        self._one(request, transport)

    def write(
        self,
        local: str,
        remote: str,
        length: int,
        *,
        local_offset: int = 0,
        remote_offset: int = 0,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> None:
        """Copy ``length`` bytes of local ``local`` into segment ``remote``; raises its error."""
        request = TransferRequest(
            Op.WRITE, local, local_offset, remote, remote_offset, length, timeout_s
        )
        self._one(request, transport)

    def write_tensor(
        self,
        tensor: Any,
        remote: str,
        *,
        remote_offset: int = 0,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> None:
        """Write the bytes of a contiguous tensor or array (CPU or CUDA) into segment ``remote``."""
        self._tensor_op(
            Op.WRITE,
            tensor,
            remote,
            remote_offset=remote_offset,
            timeout_s=timeout_s,
            transport=transport,
        )

    def read_into_tensor(
        self,
        tensor: Any,
        remote: str,
        *,
        remote_offset: int = 0,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> None:
        """Fill a contiguous tensor or array (CPU or CUDA) with bytes of segment ``remote``."""
        self._tensor_op(
            Op.READ,
            tensor,
            remote,
            remote_offset=remote_offset,
            timeout_s=timeout_s,
            transport=transport,
        )

    def _tensor_op(
        self,
        op: Op,
        tensor: Any,
        remote: str,
        *,
        remote_offset: int,
        timeout_s: float | None,
        transport: str | None,
    ) -> None:
        # A private, unnamed local side: no uuid, no registry entry under the engine's lock.
        # Measured on the 2-core box, 4 KiB p50: shm 18.7 -> 15.6 us, tcp 72 -> 60 us.
        segment = segment_from_buffer(_TENSOR, tensor)
        request = TransferRequest(
            op, _TENSOR, 0, remote, remote_offset, segment.size_bytes, timeout_s
        )
        info = self._cache.get(remote)
        if (
            info is not None
            and info.cuda_ipc is not None
            and self._cuda_one(request, info, segment, transport)
        ):
            return
        batch = self._submit([request], transport=transport, sync=True, buffers=(segment,))
        batch._wait(None)
        error = batch._errors[0]
        if error is not None:
            raise error

    # -- caller buffers -----------------------------------------------------------------

    def submit_buffers(
        self,
        op: Op,
        items: Sequence[BufferItem],
        *,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> Batch:
        """Start ONE batch whose local side is caller memory, not registered segments.

        Each item is ``(buffer, remote, remote_offset)``: READ fills the whole buffer with the
        bytes of segment ``remote`` from ``remote_offset``; WRITE copies the whole buffer there
        (slice a buffer, which costs no copy, to move part of it). Buffers are bytes-like
        objects, C-contiguous numpy arrays or contiguous CPU or CUDA torch tensors; they stay
        private (never published, no metadata round trip) and the batch keeps them alive.

        Raises InvalidRequest naming the item for a malformed item, an unsupported or
        non-contiguous buffer, or a read-only buffer given to a READ. Errors of the remote side
        (SegmentNotFound, OutOfBounds, SegmentReadOnly, PeerUnavailable, TransferTimeout) fail
        that request in the batch, as in ``submit``.
        """
        requests, segments = self._buffer_requests(op, items, timeout_s)
        return self._submit(requests, transport=transport, sync=False, buffers=segments)

    def transfer_buffers(
        self,
        op: Op,
        items: Sequence[BufferItem],
        *,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> None:
        """``submit_buffers``, wait, and raise BatchFailed naming every failed item, if any.

        A batch of one takes the one-off fast path (over tcp, this thread's own connection).
        """
        requests, segments = self._buffer_requests(op, items, timeout_s)
        batch = self._submit(
            requests, transport=transport, sync=len(requests) == 1, buffers=segments
        )
        batch._wait(None)
        batch.raise_for_errors()

    def _buffer_requests(
        self, op: Op, items: Sequence[BufferItem], timeout_s: float | None
    ) -> tuple[list[TransferRequest], list[LocalSegment]]:
        if not isinstance(op, Op):
            raise InvalidRequest(f"op must be Op.READ or Op.WRITE, got {op!r}")
        reading = op is _READ
        requests: list[TransferRequest] = []
        segments: list[LocalSegment] = []
        for index, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 3:
                raise InvalidRequest(
                    f"item {index} must be a (buffer, remote segment, remote offset) tuple, "
                    f"got {type(item).__name__}"
                )
            buffer, remote, remote_offset = item
            if not isinstance(remote, str) or not remote:
                raise InvalidRequest(
                    f"item {index}: remote segment must be a non-empty str, got {remote!r}"
                )
            name = f"buffer {index}"
            segment = segment_from_buffer(name, buffer)  # errors name "segment 'buffer N'"
            if reading and segment.readonly:
                raise SegmentReadOnly(name)
            try:
                request = TransferRequest(
                    op, name, 0, remote, remote_offset, segment.size_bytes, timeout_s
                )
            except InvalidRequest as exc:
                raise InvalidRequest(f"item {index}: {exc}") from None
            requests.append(request)
            segments.append(segment)
        return requests, segments

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Unregister every segment, stop serving, drop connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for name in list(self._published):
            try:
                self.unregister(name)
            except TransferError as exc:
                logger.warning("closing: %s", exc)
        self._server.close()
        for transport in self._transports.values():
            transport.close()
        LOCAL_OWNERS.pop(self.id, None)
        self._page_routes = {}
        with self._lock:
            leftovers = list(self._segments.values())
            self._segments.clear()
        for segment in leftovers:
            segment.close()
        self._metadata.close()
        self._heartbeat.join(timeout=5.0)
        self._finalizer.detach()
        logger.info("engine %s closed", self.id)
