"""The Transport seam, and the two transports that are plain memcpy: ``local`` and ``shm``."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from kvstack.transfer import _memory, _native
from kvstack.transfer._batch import Pages, Work
from kvstack.transfer._memory import (
    SHM_DIR,
    LocalSegment,
    ShmRegion,
    copy_region,
    host_id,
    is_alive,
)
from kvstack.transfer._types import Op, SegmentInfo
from kvstack.transfer.errors import (
    OutOfBounds,
    PeerUnavailable,
    SegmentNotFound,
    SegmentReadOnly,
    TransferError,
)

__all__ = [
    "LOCAL_OWNERS",
    "LocalTransport",
    "PageRoute",
    "ShmTransport",
    "Transport",
    "run_copy",
]

# Enum member lookups cost a descriptor call each; hot loops compare against these.
_READ = Op.READ
_WRITE = Op.WRITE

logger = logging.getLogger(__name__)

# Engines of this process: owner id -> its segment table (the ``local`` transport reads it).
LOCAL_OWNERS: dict[str, dict[str, LocalSegment]] = {}


class Transport(Protocol):
    """Moves the bytes of requests to one kind of peer."""

    name: str

    def can_reach(self, peer: SegmentInfo) -> bool:
        """Whether this transport can serve requests on the peer's segment."""
        ...

    def submit(self, works: Sequence[Work]) -> None:
        """Start the works; each ends with ``work.done(error=None|TransferError)``. Never raises."""
        ...

    def close(self) -> None: ...


def check_remote(work: Work, size_bytes: int) -> None:
    """Bounds and read-only checks against the remote segment (the serving side's checks)."""
    r = work.request
    if r.remote_offset + r.length > size_bytes:
        raise OutOfBounds(
            r.remote,
            offset=r.remote_offset,
            length=r.length,
            size_bytes=size_bytes,
            op=str(r.op),
            peer=work.remote.peer,
        )
    if r.op is Op.WRITE and work.remote.readonly:
        raise SegmentReadOnly(r.remote, peer=work.remote.peer)


def run_copy(work: Work, remote: Any) -> None:
    """Copy between the local region and ``remote`` (host array or CUDA tensor) per op."""
    r = work.request
    local = work.local.region(r.local_offset, r.length, op=str(r.op), writing=r.op is Op.READ)
    if r.op is Op.READ:
        copy_region(local, remote)
    else:
        copy_region(remote, local)


class LocalTransport:
    """Segments of engines in this very process: one copy, nothing shared or mapped."""

    name = "local"

    def can_reach(self, peer: SegmentInfo) -> bool:
        return peer.owner in LOCAL_OWNERS

    def submit(self, works: Sequence[Work]) -> None:
        for work in works:
            try:
                segments = LOCAL_OWNERS.get(work.remote.owner)
                segment = segments.get(work.request.remote) if segments is not None else None
                if segment is None or not segment.published:
                    raise SegmentNotFound(work.request.remote, peer=work.remote.peer)
                r = work.request
                remote = segment.region(
                    r.remote_offset, r.length, op=str(r.op), writing=r.op is Op.WRITE
                )
                run_copy(work, remote)
            except TransferError as exc:
                work.done(exc)
            else:
                work.done()

    def close(self) -> None:
        pass


class PageRoute(NamedTuple):
    """A page batch's way over shm between two segments, worked out once (ShmTransport.page_route):
    a repeated KV handoff then skips the route's lookups, right after other big copies have
    made every Python step slow (issue #3: 20-50 us of a 4 MiB batch's ~140 on the GPU machines)."""

    copier: _native.NativeCopier
    info: SegmentInfo
    local: LocalSegment
    region: ShmRegion  # the owner's file, mapped: kept mapped while the route is kept
    path: bytes  # the owner's file, checked per batch with the inode in ``fields``
    fields: np.ndarray  # kvstack_copy_route's ROUTE_FIELDS int64s
    fields_address: int
    op: str  # "read" or "write", for the metrics

    def copy(self, local_offsets: object, remote_offsets: object, lengths: object) -> int:
        """Check and copy one batch (int64 columns, else ValueError); the bytes copied, or a
        negative number when the batch must take the usual path, which says what is wrong: a
        bad request (nothing copied), the owner gone or its file replaced (the bytes went
        through the old mapping)."""
        return self.copier.copy_route(
            self.fields_address, self.path, local_offsets, remote_offsets, lengths
        )


class ShmTransport:
    """Same host: map the owner's /dev/shm file once, then every request is one memcpy."""

    name = "shm"

    def __init__(self) -> None:
        self._host_id = host_id()
        self._maps: dict[str, tuple[ShmRegion, int]] = {}  # shm name -> (mapping, inode)
        self._lock = threading.Lock()

    def can_reach(self, peer: SegmentInfo) -> bool:
        if peer.shm_name is None or peer.host_id != self._host_id:
            return False
        return peer.shm_name in self._maps or ShmRegion.exists(peer.shm_name)

    def region(self, info: SegmentInfo) -> ShmRegion:
        name = info.shm_name
        if name is None:
            raise SegmentNotFound(info.name, peer=info.peer)
        try:
            # The owner unlinks the file when it unregisters: a stale mapping must not
            # "succeed". One stat per segment per batch.
            inode = os.stat(os.path.join(SHM_DIR, name)).st_ino
        except FileNotFoundError:
            self._forget(name)
            raise SegmentNotFound(info.name, peer=info.peer) from None
        with self._lock:
            cached = self._maps.get(name)
            if cached is not None and cached[1] == inode:
                return cached[0]
            try:
                region = ShmRegion.open(name, info.size_bytes, writable=not info.readonly)
            except FileNotFoundError:
                raise SegmentNotFound(info.name, peer=info.peer) from None
            except OSError as exc:
                raise PeerUnavailable(f"cannot map {name!r}: {exc}", peer=info.peer) from exc
            self._maps[name] = (region, inode)
            return region

    def _forget(self, name: str) -> None:
        # Dropped, not unmapped: another thread's copy may still use it (see ShmRegion.unlink).
        with self._lock:
            self._maps.pop(name, None)

    def submit(self, works: Sequence[Work]) -> None:
        # Hot loop of a KV handoff (hundreds of pages): checks are integer compares, the owner's
        # liveness and the mapping are looked up once per segment, completion is reported once.
        regions: dict[str, ShmRegion] = {}
        done: list[int] = []
        memcpy = _memory.memcpy
        memmove = ctypes.memmove
        big = _memory.SHARED_COPY_BYTES
        streamed = _memory.STREAM_COPY_BYTES
        for work in works:
            info = work.route.remote
            r = work.request
            try:
                if r.remote_offset + r.length > info.size_bytes or (
                    info.readonly and r.op is _WRITE
                ):
                    check_remote(work, info.size_bytes)  # raises the precise error
                region = regions.get(info.name)
                if region is None:
                    if not is_alive(info.pid):
                        raise PeerUnavailable(
                            f"owner process {info.pid} has exited", peer=info.peer
                        )
                    region = regions[info.name] = self.region(info)
                if work.local.host is not None:
                    # Host to host: one memmove between two checked ranges (ctypes drops the
                    # GIL for it); cheaper per call than slicing two arrays for np.copyto.
                    local = work.local.address + r.local_offset
                    remote = region.address + r.remote_offset
                    if r.op is _READ:
                        (memmove if r.length < big else memcpy)(local, remote, r.length)
                    elif r.length < streamed:
                        memmove(remote, local, r.length)
                    else:  # into the owner's memory, which we will not read: stream it
                        memcpy(remote, local, r.length, stream=True)
                else:
                    run_copy(work, region.array[r.remote_offset : r.remote_offset + r.length])
            except TransferError as exc:
                work.done(exc)
            else:
                done.append(work.index)
        if works:
            works[0].batch._done_many(done)

    def copy_pages(self, pages: Pages) -> None:
        """Copy a bounds-checked run of ranges. Raises (nothing copied) PeerUnavailable if the
        owner is gone or its file cannot be mapped, SegmentNotFound if it was withdrawn.
        """
        info = pages.route.remote
        if not is_alive(info.pid):
            raise PeerUnavailable(f"owner process {info.pid} has exited", peer=info.peer)
        region = self.region(info)
        # Addresses computed as arrays: no Python work per page before the copy itself.
        local_addresses = pages.local_offsets + pages.local.address
        remote_addresses = pages.remote_offsets + region.address
        if pages.op is _READ:
            _memory.memcpy_ranges(local_addresses, remote_addresses, pages.lengths)
        else:
            _memory.memcpy_ranges(remote_addresses, local_addresses, pages.lengths, stream=True)

    def copy_page_columns(
        self,
        info: SegmentInfo,
        local: LocalSegment,
        *,
        reading: bool,
        local_offsets: np.ndarray,
        remote_offsets: np.ndarray,
        lengths: np.ndarray | int,
        table: np.ndarray | None,
    ) -> int | None:
        """Engine.submit_pages over shm in one native call that checks every request, then
        copies (see NativeCopier.copy_pages): the bytes copied, or None when nothing was
        copied (no native library, the owner gone or unmappable, a bad request) and the
        batch must take the general path, which says what went wrong.
        """
        copier = _native.load()
        if copier is None or not is_alive(info.pid):
            return None
        try:
            region = self.region(info)
        except TransferError:
            return None
        threads, bytes_per_thread = _memory.native_thread_policy()
        copied = copier.copy_pages(
            local_offsets,
            remote_offsets,
            lengths,
            table=table,
            local=(local.address, local.size_bytes),
            remote=(region.address, info.size_bytes),
            reading=reading,
            threads=threads,
            bytes_per_thread=bytes_per_thread,
        )
        return copied if copied >= 0 else None

    def page_route(
        self, info: SegmentInfo, local: LocalSegment, *, reading: bool
    ) -> PageRoute | None:
        """What ``copy_page_columns`` works out per batch, kept for the next batches between
        the same two segments (Engine.transfer_pages remembers it); None if the owner's file
        is gone meanwhile."""
        copier = _native.load()
        if copier is None or info.shm_name is None:
            return None
        path = os.path.join(SHM_DIR, info.shm_name)
        try:
            region = self.region(info)
            inode = os.stat(path).st_ino
        except (TransferError, OSError):
            return None
        threads, bytes_per_thread = _memory.native_thread_policy()
        fields = np.array(
            [
                local.address,
                local.size_bytes,
                region.address,
                info.size_bytes,
                int(reading),
                threads,
                bytes_per_thread,
                info.pid,
                inode - (1 << 64) if inode >= 1 << 63 else inode,  # C reads it back as ino_t
            ],
            dtype=np.int64,
        )
        assert len(fields) == _native.ROUTE_FIELDS
        op = "read" if reading else "write"
        path_bytes = os.fsencode(path)
        return PageRoute(copier, info, local, region, path_bytes, fields, fields.ctypes.data, op)

    def copy_ranges(
        self,
        info: SegmentInfo,
        *,
        reading: bool,
        local_addresses: list[int],
        remote_offsets: list[int],
        lengths: list[int],
    ) -> bool:
        """Copy between checked local host addresses and ranges of ``info`` (caller buffers,
        see Engine.submit_buffers); False (nothing copied) like ``copy_pages``.
        """
        if not is_alive(info.pid):
            return False
        try:
            region = self.region(info)
        except TransferError:
            return False
        base = region.address
        remote_addresses = [base + offset for offset in remote_offsets]
        if reading:
            _memory.memcpy_many(local_addresses, remote_addresses, lengths)
        else:
            _memory.memcpy_many(remote_addresses, local_addresses, lengths, stream=True)
        return True

    def close(self) -> None:
        with self._lock:
            self._maps = {}  # mappings go with their last reference (see ShmRegion.unlink)
