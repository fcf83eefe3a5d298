"""The master's wire format: a fixed struct header, then a JSON payload.

Header (big-endian, 20 bytes): magic ``b"KVS1"``, version u8, op u8, flags u16, request id
u64, payload length u32. A reply carries the request's op and id with FLAG_REPLY set, and
FLAG_ERROR when the payload is an error (``StoreError.to_wire()``). Bad magic, an unknown
version or an oversized length close the connection: the stream has lost its framing.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from enum import IntEnum
from typing import Any

import orjson

from kvstack.store.errors import (
    MasterUnavailable,
    ProtocolError,
    StoreError,
    StoreTimeout,
    error_from_wire,
)

__all__ = ["HEADER", "MAGIC", "MasterConnection", "Op", "read_frame", "write_frame"]

MAGIC = b"KVS1"
# 2: checksums are XXH3-64 (issue 4); a peer of version 1 would commit and verify CRC-32, so
# it is refused with a ProtocolError instead of failing every checksum.
# 3: a commit names its checksum kind (KVH-64 or XXH3-64), and a get's reply omits KVH-64.
VERSION = 3
HEADER = struct.Struct("!4sBBHQI")
FLAG_REPLY = 1
FLAG_ERROR = 2
# Metadata only ever crosses this wire; a batch of 10k keys fits well under this.
MAX_PAYLOAD_BYTES = 64 << 20
_RECV_BYTES = 64 << 10
# A pooled connection idle longer than this is checked for a hang-up before reuse.
_STALE_CHECK_S = 0.05
# Lease ids a request carries at most (the rest go with the next one): bounds its size.
_RELEASES_PER_REQUEST = 4096


class Op(IntEnum):
    HELLO = 1
    REGISTER_NODE = 2
    NODE_POLL = 3
    PUT_START = 10
    PUT_COMMIT = 11
    PUT_ABORT = 12
    GET = 13
    EXISTS = 14
    REMOVE = 15
    STATS = 20
    LIST = 21


_OPS = {int(op) for op in Op}


def pack(op: int, request_id: int, payload: bytes, *, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, flags, request_id, len(payload)) + payload


def parse_header(raw: bytes, *, peer: str) -> tuple[int, int, int, int]:
    """(op, flags, request id, length); raises ProtocolError naming the bytes seen."""
    magic, version, op, flags, request_id, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic in frame header {raw!r}", peer=peer)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (want {VERSION})", peer=peer)
    if length > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            f"payload of {length} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}", peer=peer
        )
    return op, flags, request_id, length


# orjson first: encoding and decoding one small frame costs ~0.1-0.5 us against 1.3-2.6 us for
# the json module (2-core box), four times per master round trip on each side (issue 4). The
# json module stays for what orjson refuses: keys holding lone surrogates (valid str keys) and
# integers past 64 bits.
# One json encoder and decoder for every frame: json.dumps/json.loads with arguments build new
# ones and sniff the encoding per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()


def decode(payload: bytes, *, peer: str) -> dict[str, Any]:
    if not payload:
        return {}
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            data = _DECODER.decode(payload.decode("utf-8", "surrogatepass"))
        except ValueError:  # UnicodeDecodeError included
            raise ProtocolError(f"payload is not JSON: {payload[:64]!r}", peer=peer) from None
    if not isinstance(data, dict):
        raise ProtocolError(f"payload is not a JSON object: {payload[:64]!r}", peer=peer)
    return data


def encode(data: object) -> bytes:
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(data).encode()


async def read_frame(
    reader: asyncio.StreamReader, *, peer: str, idle_timeout_s: float, frame_timeout_s: float
) -> tuple[int, int, int, bytes] | None:
    """(op, flags, id, payload), or None on a clean EOF between frames."""
    try:
        raw = await asyncio.wait_for(reader.readexactly(HEADER.size), idle_timeout_s)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError(f"truncated frame header {exc.partial!r}", peer=peer) from None
    op, flags, request_id, length = parse_header(raw, peer=peer)
    try:
        payload = await asyncio.wait_for(reader.readexactly(length), frame_timeout_s)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"truncated payload: {len(exc.partial)} of {length} bytes", peer=peer
        ) from None
    return op, flags, request_id, payload


async def write_frame(writer: asyncio.StreamWriter, frame: bytes, *, timeout_s: float) -> None:
    writer.write(frame)
    await asyncio.wait_for(writer.drain(), timeout_s)


class _Stale(Exception):
    """The pooled connection was closed by the master while idle."""


# Called with the reply to a request sent ahead of a call (see _Socket.call): the reply's flags
# and payload. It runs on whichever thread reads that reply and must not raise.
OnReply = Callable[[int, bytes], None]


class _Socket:
    """One connection, non-blocking underneath; closed on any error so a half-read stream is
    never reused.

    A call polls for its reply for up to ``spin_s`` before it sleeps in poll(): on the 2-core
    VM box a blocked receiver's vCPU halts, and waking it costs the sender and the receiver
    tens of microseconds (loopback echo through an asyncio server: p50 85-90 us blocking, 30 us
    polling; issue 4). Non-blocking, CPython also skips the poll() it makes before every
    send and recv on a socket with a timeout.

    A call may send a second request ahead, in the same write, whose reply it does not wait
    for: that reply is "owed" and handed to its callback by whichever later call (or
    ``settle``) on this connection reads it, in the order the master answers.
    """

    def __init__(
        self, host: str, port: int, *, timeout_s: float, spin_s: float, unix: str = ""
    ) -> None:
        self.peer = f"{host}:{port}"  # the master's address in errors, whichever socket
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.settimeout(timeout_s)
                self.sock.connect(unix)
            except BaseException:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            if not unix:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setblocking(False)
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        except BaseException:
            self.sock.close()
            raise
        self._spin_s = spin_s
        self._ids = itertools.count(1)
        # Replies usually arrive whole: one recv_into a reused buffer, not header then body.
        # Bytes received past one reply (the next, owed, one) stay in _buf[_start:_end].
        self._buf = bytearray(_RECV_BYTES)
        self._start = self._end = 0
        self.owed: dict[int, tuple[int, OnReply]] = {}  # request id -> (op, callback)
        self.last_used = time.monotonic()

    def call(
        self,
        op: int,
        payload: bytes,
        *,
        timeout_s: float,
        while_waiting: Callable[[], object] | None = None,
        ahead: tuple[int, bytes, OnReply] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request (and ``ahead``, (op, payload, callback), after it in the same
        write); return the first one's (flags, payload), handing owed replies that come
        first to their callbacks."""
        request_id = next(self._ids)
        deadline = time.monotonic() + timeout_s
        frame = pack(op, request_id, payload)
        ahead_id = 0
        if ahead is not None:
            ahead_id = next(self._ids)
            frame += pack(ahead[0], ahead_id, ahead[1])
        self._send(frame, deadline)
        if ahead is not None:
            self.owed[ahead_id] = (ahead[0], ahead[2])
        if while_waiting is not None:
            while_waiting()
        while True:
            r_op, flags, r_id, body = self._read_frame(deadline)
            if r_id == request_id and r_op == op and flags & FLAG_REPLY:
                return flags, body
            self._pay(r_op, flags, r_id, body, request=(op, request_id))

    def settle(self, timeout_s: float) -> None:
        """Read every owed reply and hand it to its callback."""
        deadline = time.monotonic() + timeout_s
        while self.owed:
            self._pay(*self._read_frame(deadline), request=None)

    def _pay(
        self, op: int, flags: int, request_id: int, body: bytes, *, request: tuple[int, int] | None
    ) -> None:
        owed = self.owed.pop(request_id, None)
        if owed is None or owed[0] != op or not flags & FLAG_REPLY:
            expected = "an owed reply"
            if request is not None:
                expected = f"request (op {request[0]}, id {request[1]}) or {expected}"
            raise ProtocolError(
                f"reply (op {op}, id {request_id}) does not match {expected}", peer=self.peer
            )
        owed[1](flags, body)

    def _read_frame(self, deadline: float) -> tuple[int, int, int, bytes]:
        """The next whole frame: (op, flags, request id, payload)."""
        self._fill(HEADER.size, deadline)
        start = self._start
        r_op, flags, r_id, length = parse_header(
            bytes(self._buf[start : start + HEADER.size]), peer=self.peer
        )
        self._fill(HEADER.size + length, deadline)
        start = self._start
        body = bytes(self._buf[start + HEADER.size : start + HEADER.size + length])
        self._start = start + HEADER.size + length
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > _RECV_BYTES:  # a big reply's buffer is not kept
                self._buf = bytearray(_RECV_BYTES)
        return r_op, flags, r_id, body

    def _send(self, frame: bytes, deadline: float) -> None:
        sock = self.sock
        sent = sock.send(frame)  # a frame of metadata fits the socket buffer at once
        if sent == len(frame):
            return
        view = memoryview(frame)
        while sent < len(frame):
            self._wait(select.POLLOUT, deadline)
            with suppress(BlockingIOError):
                sent += sock.send(view[sent:])

    def _fill(self, need: int, deadline: float) -> None:
        """Receive until at least ``need`` unread bytes are buffered."""
        if self._end - self._start >= need:
            return
        buf = self._buf
        if self._start + need > len(buf):  # make room: move the unread bytes to the front
            unread = buf[self._start : self._end]
            if need > len(buf):
                buf = self._buf = bytearray(max(need, _RECV_BYTES))
            buf[: len(unread)] = unread
            self._start, self._end = 0, len(unread)
        view = memoryview(buf)
        recv_into = self.sock.recv_into
        spin_until = 0.0
        while self._end - self._start < need:
            try:
                k = recv_into(view[self._end :])
            except BlockingIOError:
                now = time.perf_counter()
                if not spin_until:
                    spin_until = now + self._spin_s
                if now >= spin_until:
                    self._wait(select.POLLIN, deadline)
                else:
                    # The master may be queued on this very CPU: let it run.
                    os.sched_yield()
                continue
            if k == 0:
                raise ConnectionError(
                    f"connection closed by {self.peer} after {self._end - self._start} bytes"
                )
            self._end += k

    def _wait(self, events: int, deadline: float) -> None:
        """Sleep until the socket is ready for ``events``; TimeoutError at the deadline."""
        left = deadline - time.monotonic()
        if left > 0:
            self._poller.modify(self.sock, events)
            # poll() takes whole milliseconds: round up, or a short wait would spin.
            if self._poller.poll(left * 1000 + 1):
                return
        raise TimeoutError(f"no reply from {self.peer} before the deadline")

    def closed_by_peer(self) -> bool:
        """True if the peer hung up (or sent junk) while this connection sat idle in the pool."""
        try:
            self._poller.modify(self.sock, select.POLLIN)
            readable = self._poller.poll(0)
        except (OSError, ValueError):
            return True
        return bool(readable)  # an idle connection has nothing to read unless it is closed

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()


class MasterConnection:
    """A thread-safe pool of connections to the master; ``call`` sends one request.

    ``spin_s``: how long a call polls for its reply before sleeping (see ``_Socket``).

    Transport failures become MasterUnavailable or StoreTimeout naming the master; error
    replies become the StoreError the master raised.
    """

    def __init__(
        self, address: str, *, connect_timeout_s: float = 5.0, spin_s: float = 0.0
    ) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self._host = host
        self._port = int(port)
        self._connect_timeout_s = connect_timeout_s
        self._spin_s = spin_s
        self._idle: list[_Socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._released: collections.deque[int] = collections.deque()
        self._unix = ""

    def use_unix(self, address: str) -> None:
        """Open new connections on the master's Unix socket ``address`` (from HELLO) instead of
        TCP; pooled TCP connections are dropped. Where it cannot be reached (another host, or
        the master restarted under a new address) connections fall back to TCP for good."""
        with self._lock:
            self._unix = address
            idle = self._idle
            self._idle = []
        for sock in idle:
            sock.close()

    def _take(self, timeout_s: float) -> _Socket:
        """A pooled connection, or a new one; raises _Stale if the pooled one was closed."""
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        if sock is not None:
            # Only a connection idle for a while can have been closed under us cheaply enough
            # to check (a select() per call would cost more than the check saves). Replies
            # owed to it arrived long ago: read them first, or it would look readable.
            if time.monotonic() - sock.last_used < _STALE_CHECK_S:
                return sock
            try:
                sock.settle(timeout_s)
            except (OSError, StoreError):  # TimeoutError is an OSError
                sock.owed.clear()  # lost with the connection: a started put expires unused
            else:
                if not sock.closed_by_peer():
                    return sock
            with self._lock:
                stale = [sock, *self._idle]
                self._idle = []
            for old in stale:
                old.close()
            raise _Stale
        timeout_s = min(timeout_s, self._connect_timeout_s)
        unix = self._unix
        if unix:
            try:
                return _Socket(
                    self._host, self._port, timeout_s=timeout_s, spin_s=self._spin_s, unix=unix
                )
            except OSError:  # not this host's master (any more): TCP from now on
                self._unix = ""
        try:
            return _Socket(self._host, self._port, timeout_s=timeout_s, spin_s=self._spin_s)
        except OSError as exc:
            raise MasterUnavailable(self.address, reason=str(exc) or type(exc).__name__) from exc

    def _exchange(
        self,
        op: Op,
        payload: bytes,
        timeout_s: float,
        while_waiting: Callable[[], object] | None,
        ahead: tuple[int, bytes, OnReply] | None,
    ) -> tuple[int, bytes]:
        sock = self._take(timeout_s)
        try:
            reply = sock.call(
                op, payload, timeout_s=timeout_s, while_waiting=while_waiting, ahead=ahead
            )
        except BaseException:
            sock.close()  # a half-read stream is never reused
            raise
        self._put_back(sock)
        return reply

    def _put_back(self, sock: _Socket) -> None:
        sock.last_used = time.monotonic()
        with self._lock:
            if self._closed:
                sock.close()
            else:
                self._idle.append(sock)

    def settle(self, timeout_s: float) -> None:
        """Read the owed replies of every idle connection (see ``call``'s ``ahead``); a
        connection that fails to deliver them is closed and its callbacks never run."""
        with self._lock:
            owing = [sock for sock in self._idle if sock.owed]
            self._idle = [sock for sock in self._idle if not sock.owed]
        for sock in owing:
            try:
                sock.settle(timeout_s)
            except (OSError, StoreError):  # TimeoutError is an OSError
                sock.close()
                continue
            self._put_back(sock)

    def call(
        self,
        op: Op,
        data: dict[str, Any],
        *,
        timeout_s: float,
        while_waiting: Callable[[], object] | None = None,
        ahead: tuple[Op, dict[str, Any], Callable[[dict[str, Any] | StoreError], None]]
        | None = None,
    ) -> dict[str, Any]:
        """Send ``data`` as op; return the reply payload or raise the master's error.

        ``while_waiting`` runs once the request is sent, before the reply is read: work that
        overlaps the master's (a put's checksum overlaps its PUT_START).

        ``ahead`` is a second request, (op, data, callback), sent in the same write, whose
        reply this call does not wait for: the master answers this call first, and the
        callback gets the other reply (or its error) when a later call on the connection,
        or ``settle``, reads it. It must not raise. If the connection dies first, it never
        runs.
        """
        if self._released:
            data = {**data, "released": self._take_released()}
        payload = encode(data)
        sent_ahead: tuple[int, bytes, OnReply] | None = None
        if ahead is not None:
            ahead_op, ahead_data, on_reply = ahead
            address = self.address

            def decoded(flags: int, body: bytes) -> None:
                try:
                    reply = decode(body, peer=address)
                except StoreError as exc:
                    on_reply(exc)
                    return
                on_reply(error_from_wire(reply) if flags & FLAG_ERROR else reply)

            sent_ahead = (ahead_op, encode(ahead_data), decoded)
        try:
            try:
                flags, body = self._exchange(op, payload, timeout_s, while_waiting, sent_ahead)
            except _Stale:
                # A pooled connection the master closed while idle (it restarted): the
                # request never reached a live master, so it is safe to send it on a new one.
                # (_take raised before anything was sent: while_waiting has not run.)
                flags, body = self._exchange(op, payload, timeout_s, while_waiting, sent_ahead)
        except TimeoutError as exc:
            raise StoreTimeout(
                f"{op.name} request to master {self.address}", timeout_s=timeout_s
            ) from exc
        except StoreError:
            raise
        except OSError as exc:
            raise MasterUnavailable(self.address, reason=str(exc) or type(exc).__name__) from exc
        reply = decode(body, peer=self.address)
        if flags & FLAG_ERROR:
            raise error_from_wire(reply)
        return reply

    def release(self, lease_ids: Iterable[int]) -> None:
        """Tell the master, with the next request, that this client is done reading under these
        GET leases (each id once per item read, and only after its bytes were copied)."""
        self._released.extend(lease_ids)

    def _take_released(self) -> list[int]:
        taken: list[int] = []
        with suppress(IndexError):  # another thread took the rest
            while len(taken) < _RELEASES_PER_REQUEST:
                taken.append(self._released.popleft())
        return taken

    def call_retrying(self, op: Op, data: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """``call`` for idempotent ops: retry MasterUnavailable until the deadline."""
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            left = deadline - time.monotonic()
            try:
                return self.call(op, data, timeout_s=max(left, 0.01))
            except MasterUnavailable:
                if time.monotonic() + delay >= deadline:
                    raise
            time.sleep(delay)  # back-off between reconnect attempts, bounded by the deadline
            delay = min(delay * 2, 0.5)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = self._idle
            self._idle = []
        for sock in idle:
            sock.close()
