"""The tcp wire format: a fixed 32-byte header, then the segment name, then the payload.

    magic b"KVTE" | version u8 | op u8 | name_len u16 | request_id u64 | offset u64 | length u64

Requests: HELLO (name = expected owner id, payload = token), READ (no payload), WRITE (payload
of ``length`` bytes), READV/WRITEV (many ranges of one segment, see FrameOp). Replies: OK (READ:
``length`` bytes of data follow; else none) or ERROR (``length`` bytes of JSON, a
TransferError.to_wire()). Little-endian, like every host we run on.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from enum import IntEnum

import numpy as np

from kvstack.transfer import _native
from kvstack.transfer.errors import PeerUnavailable, ProtocolError, TransferError, TransferTimeout

__all__ = [
    "HEADER",
    "MAGIC",
    "VERSION",
    "FrameOp",
    "Ranges",
    "pack",
    "recv_exact_into",
    "send_buffers",
    "send_frames",
    "set_tick",
]

MAGIC = b"KVTE"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQQ")
# Linux IOV_MAX is 1024; stay well below it per sendmsg call.
_MAX_IOV = 512
_MAX_NAME_BYTES = 4096
# Largest ERROR payload we accept; anything bigger is junk.
MAX_ERROR_BYTES = 1 << 16


class FrameOp(IntEnum):
    HELLO = 1
    READ = 2
    WRITE = 3
    OK = 4
    ERROR = 5
    # Vectored requests: many (offset, length) ranges of one segment in one frame. The header's
    # ``offset`` field holds the range count, ``length`` the total bytes; after the name come
    # ``count`` little-endian (offset u64, length u64) pairs, then (READV: none) the payload.
    READV = 6
    WRITEV = 7


_OPS = {int(op): op for op in FrameOp}


def pack(
    op: FrameOp, request_id: int, *, name: bytes = b"", offset: int = 0, length: int = 0
) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, len(name), request_id, offset, length)


def unpack(raw: bytes | bytearray | memoryview, *, peer: str) -> tuple[FrameOp, int, int, int, int]:
    """(op, name_len, request_id, offset, length); raises ProtocolError on anything else."""
    magic, version, op, name_len, request_id, offset, length = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame header {bytes(raw)!r}", peer=peer)
    frame_op = _OPS.get(op)  # a dict, not FrameOp(op): this runs for every frame
    if frame_op is None:
        raise ProtocolError(f"unknown op {op} in header {bytes(raw)!r}", peer=peer)
    if name_len > _MAX_NAME_BYTES:
        raise ProtocolError(f"segment name of {name_len} bytes in {bytes(raw)!r}", peer=peer)
    return frame_op, name_len, request_id, offset, length


def set_tick(sock: socket.socket, tick_s: float) -> None:
    """Blocking socket whose calls give up after tick_s (EAGAIN) so callers can check deadlines.

    Kernel timeouts instead of ``settimeout``: CPython polls before every call on a socket with
    a timeout, an extra syscall per 4 KiB request.
    """
    sock.settimeout(None)
    seconds = int(tick_s)
    packed = struct.pack("ll", seconds, int((tick_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, packed)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, packed)


def error_frame(request_id: int, error: TransferError) -> list[bytes]:
    payload = json.dumps(error.to_wire()).encode()
    return [pack(FrameOp.ERROR, request_id, length=len(payload)), payload]


def recv_exact_into(
    sock: socket.socket, view: memoryview, *, peer: str, expired: Callable[[], bool]
) -> None:
    """Fill ``view`` from the socket, straight into the caller's memory.

    The socket has a short timeout (a tick): each tick asks ``expired()`` whether to give up
    (TransferTimeout); EOF raises PeerUnavailable.
    """
    pos, end = 0, len(view)
    while pos < end:
        try:
            n = sock.recv_into(view[pos:], end - pos)
        except (TimeoutError, BlockingIOError):
            if expired():
                raise TransferTimeout(
                    f"receiving {end} bytes ({pos} arrived)", timeout_s=0.0, peer=peer
                ) from None
            continue
        if n == 0:
            raise PeerUnavailable(f"connection closed after {pos} of {end} bytes", peer=peer)
        pos += n


class Ranges:
    """Checked ranges of one host array as one piece of a frame: the ``lengths[i]`` bytes at
    ``addresses[i]`` for each i, in order (a vectored frame's pages), inside ``memory``.

    Sent and received by the native library in one call per frame, with no Python object per
    range (issue #3); without it, as one memoryview per range. Built from arrays the caller
    has already checked and laid out (``kvstack_plan_pages``, ``kvstack_check_wire``): no
    numpy arithmetic per frame.
    """

    __slots__ = ("address", "addresses", "lengths", "memory", "nbytes")

    def __init__(
        self,
        memory: np.ndarray,
        addresses: np.ndarray,
        lengths: np.ndarray,
        *,
        address: int,
        nbytes: int,
    ) -> None:
        self.memory = memory  # 1-D uint8; holding it keeps the memory alive until sent
        self.address = address  # of memory[0] (LocalSegment.address)
        self.addresses = addresses  # int64, C-contiguous
        self.lengths = lengths  # int64, C-contiguous
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes

    def views(self) -> list[memoryview]:
        memory, base = self.memory.data, self.address
        return [
            memory[a - base : a - base + n]
            for a, n in zip(self.addresses.tolist(), self.lengths.tolist(), strict=True)
        ]


def send_frames(
    sock: socket.socket,
    items: Sequence[bytes | memoryview | Ranges],
    *,
    peer: str,
    expired: Callable[[], bool],
) -> None:
    """``send_buffers`` for frames that may carry ``Ranges``: the buffers before each Ranges
    in one gather write, then its ranges in native calls (or as memoryviews without them)."""
    native = _native.load()
    pending: list[bytes | memoryview] = []
    for item in items:
        if not isinstance(item, Ranges):
            pending.append(item)
        elif native is None:
            pending += item.views()
        elif item.nbytes:
            if pending:
                # MSG_MORE: the header waits for the ranges, one segment on the wire, not two.
                send_buffers(sock, pending, peer=peer, expired=expired, flags=socket.MSG_MORE)
                pending = []
            done = ctypes.c_int64(0)
            while not native.send_ranges(sock.fileno(), item.addresses, item.lengths, done):
                if expired():
                    raise TransferTimeout("sending", timeout_s=0.0, peer=peer)
    send_buffers(sock, pending, peer=peer, expired=expired)


def send_buffers(
    sock: socket.socket,
    buffers: Sequence[bytes | memoryview],
    *,
    peer: str,
    expired: Callable[[], bool],
    flags: int = 0,
) -> None:
    """Gather-write all buffers (sendmsg), resuming after partial sends and ticks."""
    views = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + _MAX_IOV], [], flags)
        except (TimeoutError, BlockingIOError):
            if expired():
                raise TransferTimeout("sending", timeout_s=0.0, peer=peer) from None
            continue
        while sent:
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


class FrameReader:
    """Buffered reads from a socket: many small frames per ``recv``, big payloads straight through.

    Headers, names and small payloads are served from one buffer (one syscall for a whole
    batch of 16 KiB pages); ``read_into`` copies what is buffered and receives the rest
    directly into the destination. ``on_idle`` runs before every socket read (the server
    flushes its coalesced replies there).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str,
        size_bytes: int = 256 << 10,
        on_idle: Callable[[], None] | None = None,
        poll_s: float = 0.0,
    ) -> None:
        self._sock = sock
        self.peer = peer
        self._buf = bytearray(size_bytes)
        self._view = memoryview(self._buf)
        self._address: int = np.frombuffer(self._buf, dtype=np.uint8).ctypes.data
        self._start = 0
        self._end = 0
        self._on_idle = on_idle
        self._poll_s = poll_s

    def _recv(self, dest: memoryview | list[memoryview], expired: Callable[[], bool]) -> int:
        """Receive into one buffer or scatter into several (recvmsg_into); at least one byte."""
        views = dest if isinstance(dest, list) else [dest]
        if self._on_idle is not None:
            # About to wait for the peer: what we owe it goes out first. One recv fills the
            # buffer with many frames, so replies still leave coalesced.
            self._on_idle()
        if self._poll_s:
            n = self._poll(views)
            if n:
                return n
        while True:
            try:
                n = self._sock.recvmsg_into(views)[0]
            except (TimeoutError, BlockingIOError):
                if expired():
                    raise TransferTimeout("receiving", timeout_s=0.0, peer=self.peer) from None
                continue
            if n == 0:
                raise PeerUnavailable("connection closed", peer=self.peer)
            return n

    def _poll(self, views: list[memoryview]) -> int:
        """Bytes received by polling for up to ``poll_s``, or 0 (then the caller blocks).

        A thread that sleeps in recv is woken by the peer's bytes, which costs tens of
        microseconds on a VM; polling costs this thread's CPU for at most ``poll_s``. Tcp 4 KiB
        write p50 on the 2-core box: 111-157 us sleeping on both sides, 62-68 with the caller
        polling, 29-30 with the serving side polling too. EOF and errors are left to the
        blocking recv, which names them.
        """
        until = time.perf_counter() + self._poll_s
        while True:
            try:
                return self._sock.recvmsg_into(views, 0, socket.MSG_DONTWAIT)[0]
            except BlockingIOError:
                if time.perf_counter() >= until:
                    return 0
                os.sched_yield()  # the peer may be queued on this very CPU: let it run
            except OSError:
                return 0

    def empty(self) -> bool:
        """Whether no received bytes wait in the buffer."""
        return self._start == self._end

    def push_front(self, data: bytes) -> None:
        """Put back bytes read from the socket by someone else (the native WRITEV server),
        to be read first; only while the buffer is empty."""
        if self._start != self._end or len(data) > len(self._buf):
            raise ValueError("push_front needs an empty buffer large enough for the bytes")
        self._view[: len(data)] = data
        self._start, self._end = 0, len(data)

    def read(self, n: int, expired: Callable[[], bool]) -> bytes:
        """Exactly ``n`` bytes (n <= buffer size)."""
        while self._end - self._start < n:
            if len(self._buf) - self._start < n:  # compact: move the tail to the front
                left = self._end - self._start
                self._view[:left] = self._view[self._start : self._end]
                self._start, self._end = 0, left
            self._end += self._recv(self._view[self._end :], expired)
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        return data

    def read_into(self, dest: memoryview, expired: Callable[[], bool]) -> None:
        """Fill ``dest``: buffered bytes first, then straight from the socket into it."""
        have = min(self._end - self._start, len(dest))
        if have:
            dest[:have] = self._view[self._start : self._start + have]
            self._start += have
        pos = have
        while pos < len(dest):
            pos += self._recv(dest[pos:], expired)

    def read_into_many(self, dests: Sequence[memoryview], expired: Callable[[], bool]) -> None:
        """Fill every view in order: buffered bytes first, then scattered reads straight in."""
        views = [v for v in dests if len(v)]
        i = 0
        while i < len(views) and self._end > self._start:
            view = views[i]
            have = min(self._end - self._start, len(view))
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
            if have < len(view):
                views[i] = view[have:]
            else:
                i += 1
        while i < len(views):
            got = self._recv(views[i : i + _MAX_IOV], expired)
            while got:
                n = len(views[i])
                if got >= n:
                    got -= n
                    i += 1
                else:
                    views[i] = views[i][got:]
                    got = 0

    def read_ranges(self, ranges: Ranges, expired: Callable[[], bool]) -> None:
        """Fill the ranges in order: buffered bytes first, then straight from the socket."""
        native = _native.load()
        if native is None:
            self.read_into_many(ranges.views(), expired)
            return
        have = min(self._end - self._start, ranges.nbytes)
        buffered_address = self._address + self._start
        if have < ranges.nbytes and self._on_idle is not None:
            self._on_idle()  # about to wait for the peer: see _recv
        done = ctypes.c_int64(0)
        fd = self._sock.fileno()
        try:
            while not native.recv_ranges(
                fd,
                ranges.addresses,
                ranges.lengths,
                done,
                buffered_address=buffered_address,
                buffered_bytes=have,
            ):
                if expired():
                    raise TransferTimeout(
                        f"receiving {ranges.nbytes} bytes ({done.value} arrived)",
                        timeout_s=0.0,
                        peer=self.peer,
                    )
        except EOFError:
            raise PeerUnavailable(
                f"connection closed after {done.value} of {ranges.nbytes} bytes", peer=self.peer
            ) from None
        self._start += have  # the buffered bytes were consumed by the first call

    def skip(self, n: int, expired: Callable[[], bool]) -> None:
        """Discard ``n`` bytes (a refused WRITE's payload)."""
        while n:
            if self._start == self._end:
                self._start = self._end = 0
                self._end = self._recv(self._view, expired)
            k = min(n, self._end - self._start)
            self._start += k
            n -= k
