"""The native data path (``_copy.c``): built with the system C compiler on first use, cached
per user, loaded with ctypes.

One foreign call, GIL released, moves a whole batch of ranges: a copy shared by bytes over a
few threads, or a tcp frame's pages sent or received (issue #3: 256 scattered 16 KiB pages cost
256 ``ctypes.memmove`` calls or memoryviews, each taking the GIL again, so Python threads made
page batches slower, not faster). Without a compiler (or with ``KVSTACK_TRANSFER_NATIVE_COPY=0``)
``load()`` returns None and callers keep their pure-Python path; why is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvstack.transfer import _env
from kvstack.transfer.errors import ConfigError

__all__ = ["NativeCopier", "NativeUnavailable", "ReplySlots", "Scratch", "build", "load"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_copy.c")
_FLAGS = ("-O2", "-shared", "-fPIC", "-pthread")
# A cold gcc -O2 of _copy.c takes ~0.1 s; this only bounds a hung compiler.
_COMPILE_TIMEOUT_S = 120.0


class NativeUnavailable(Exception):
    """Why the native library cannot be used here (no compiler, compile or load failure)."""


_I64P = ctypes.POINTER(ctypes.c_int64)


# kvstack_serve_frame's statuses and scratch size (see _copy.c).
SERVE_DONE, SERVE_PUNT, SERVE_IDLE, SERVE_EOF, SERVE_STALL = range(5)
SERVE_SCRATCH = 32 + 4096 + 16 * 1024
# kvstack_copy_route: the int64s describing a route, and its "owner gone" result.
ROUTE_FIELDS = 9
ROUTE_STALE = -(1 << 63)
# int64s per unit of kvstack_send_parallel.
SEND_UNIT = 7
# kvstack_await_replies: slot states, statuses and the scratch it reads a header into.
SLOT_FREE, SLOT_ARMED, SLOT_OK, SLOT_FAILED = range(4)
REPLY_PUNT, REPLY_IDLE, REPLY_EOF = 1, 2, 3
REPLY_SCRATCH = 32
# kvstack_lane_call's statuses and the scratch it reads a reply's header into.
LANE_DONE, LANE_PUNT, LANE_TIMEOUT, LANE_EOF = range(4)
LANE_SCRATCH = 32
# int64s per connection row of kvstack_send_pages: socket, request id, status.
SEND_PAGES_CONN = 3
# kvstack_send_pages: the batch cannot go this way (too many pages a connection, no memory).
SEND_PAGES_REFUSED = -(1 << 63)


def _int64s(values: np.ndarray) -> np.ndarray:
    # The C side reads n int64s from each pointer: never hand it another dtype or a strided
    # view (no copy, and no numpy call, when the array is already right).
    if values.dtype == np.int64 and values.ndim == 1 and values.flags.c_contiguous:
        return values
    return np.ascontiguousarray(values, dtype=np.int64)


class ReplySlots:
    """A tcp connection's table of requests whose OK reply its receiver thread takes natively
    (kvstack_await_replies): request ids and int32 states (SLOT_*), shared with the C side.
    Lives as long as the connection, so a late reply never lands in freed memory."""

    def __init__(self, size: int) -> None:
        self.ids = np.zeros(size, dtype=np.int64)
        self.states = np.zeros(size, dtype=np.int32)
        self.free = list(range(size))  # guarded by the connection's lock
        # Looked up once: ``.ctypes.data`` runs numpy's Python-level wrapper, 5-25 us per
        # array when cold (issue #3), and these are passed on every reply.
        self.ids_address: int = self.ids.ctypes.data
        self.states_address: int = self.states.ctypes.data


class Scratch:
    """A buffer and a few int64 results that one thread hands to the same native call again
    and again (serve_frame, await_replies, lane_call), their addresses looked up once."""

    def __init__(self, size: int, results: int) -> None:
        self.buffer = np.empty(size, dtype=np.uint8)
        self.out = np.zeros(results, dtype=np.int64)
        self.buffer_address: int = self.buffer.ctypes.data
        self.out_address: int = self.out.ctypes.data

    def left(self) -> bytes:
        """The bytes a punted call left in the buffer (``out[0]`` of them)."""
        return self.buffer[: int(self.out[0])].tobytes()


class NativeCopier:
    """The functions of one loaded ``_copy.c`` library."""

    def __init__(self, path: str) -> None:
        self.path = path
        library = ctypes.CDLL(path)  # CDLL (not PyDLL): every call releases the GIL
        vp, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._copy = library.kvstack_copy_ranges
        self._copy.argtypes = (vp, vp, vp, i64, c_int, c_int)
        self._copy.restype = c_int
        self._send = library.kvstack_send_ranges
        self._send.argtypes = (c_int, vp, vp, i64, _I64P)
        self._send.restype = c_int
        self._recv = library.kvstack_recv_ranges
        self._recv.argtypes = (c_int, vp, vp, i64, vp, i64, _I64P)
        self._recv.restype = c_int
        self._hash = library.kvstack_hash_ranges
        self._hash.argtypes = (vp, vp, vp, i64, c_int, c_int, vp)
        self._hash.restype = c_int
        self._hash_copy = library.kvstack_hash_copy
        self._hash_copy.argtypes = (i64, i64, i64, c_int, c_int)
        self._hash_copy.restype = ctypes.c_uint64
        self._pages = library.kvstack_copy_pages
        self._pages.argtypes = (vp, vp, vp, i64, i64, vp, i64, i64, i64, i64, c_int, c_int, i64)
        self._pages.restype = i64
        self._route = library.kvstack_copy_route
        self._route.argtypes = (vp, ctypes.c_char_p, vp, vp, vp, i64, i64)
        self._route.restype = i64
        self._plan = library.kvstack_plan_pages
        self._plan.argtypes = (vp, vp, vp, i64, i64, i64, i64, i64, i64, vp, vp, vp)
        self._plan.restype = i64
        self._check_wire = library.kvstack_check_wire
        self._check_wire.argtypes = (ctypes.c_char_p, i64, i64, i64, i64, vp, vp)
        self._check_wire.restype = i64
        self._serve_frame = library.kvstack_serve_frame
        self._serve_frame.argtypes = (c_int, vp, i64, ctypes.c_char_p, vp, i64, vp, i64, vp)
        self._serve_frame.restype = i64
        self._send_parallel = library.kvstack_send_parallel
        self._send_parallel.argtypes = (vp, i64, i64)
        self._send_parallel.restype = None
        self._set_helper_spin = library.kvstack_set_helper_spin
        self._set_helper_spin.argtypes = (i64,)
        self._set_helper_spin.restype = None
        self._send_pages = library.kvstack_send_pages
        self._send_pages.argtypes = (
            vp,
            vp,
            vp,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            ctypes.c_char_p,
            i64,
            vp,
            i64,
            i64,
        )
        self._send_pages.restype = i64
        self._await_replies = library.kvstack_await_replies
        self._await_replies.argtypes = (c_int, vp, vp, i64, vp, vp)
        self._await_replies.restype = i64
        self._lane_call = library.kvstack_lane_call
        self._lane_call.argtypes = (
            c_int, ctypes.c_char_p, i64, i64, i64, i64, i64, ctypes.c_uint64, i64, i64, vp, vp
        )  # fmt: skip
        self._lane_call.restype = i64
        self._finish_slot = library.kvstack_finish_slot
        self._finish_slot.argtypes = (vp, ctypes.c_int32)
        self._finish_slot.restype = c_int
        self._wait_slot = library.kvstack_wait_slot
        self._wait_slot.argtypes = (vp, i64)
        self._wait_slot.restype = ctypes.c_int32
        self._library = library  # keeps the library loaded as long as its functions are used

    def set_helper_spin(self, seconds: float) -> None:
        """How long helper threads poll for the next job after one before parking (0: not
        at all). Process-wide: every copier shares one pool."""
        self._set_helper_spin(int(seconds * 1e9))

    def copy_ranges(
        self,
        dsts: np.ndarray,
        srcs: np.ndarray,
        lengths: np.ndarray,
        *,
        threads: int,
        stream: bool = False,
    ) -> int:
        """Copy ``lengths[i]`` bytes from address ``srcs[i]`` to address ``dsts[i]`` for every
        i, on this thread and up to ``threads - 1`` helpers; returns how many threads copied.
        ``stream``: long runs bypass the cache (for bytes this process will not read again).

        Every range must be bounds-checked by the caller: the C side trusts them.
        """
        dsts, srcs, lengths = _int64s(dsts), _int64s(srcs), _int64s(lengths)
        n = _same_length(dsts, srcs, lengths)
        return int(
            self._copy(
                dsts.ctypes.data, srcs.ctypes.data, lengths.ctypes.data, n, threads, int(stream)
            )
        )

    def copy_pages(
        self,
        local_offsets: np.ndarray,
        remote_offsets: np.ndarray,
        lengths: np.ndarray | int,
        *,
        table: np.ndarray | None,
        local: tuple[int, int],
        remote: tuple[int, int],
        reading: bool,
        threads: int,
        bytes_per_thread: int,
    ) -> int:
        """Check, then copy, a page batch given as columns of offsets into two segments
        (``local``/``remote``: base address and size): request i moves ``lengths[i]`` bytes
        (``lengths`` bytes each, if an int) from local to remote (remote to local if
        ``reading``). The columns must be C-contiguous int64 arrays of one length; ``table``
        (int64 [3, n], or None) receives a copy of them.

        Returns the bytes copied, or ``-1 - i`` when request i has a negative value or a range
        outside either segment: then nothing was copied.
        """
        # The C side writes 3n int64s into the table: refuse anything else.
        n, local_column, remote_column, lengths_column, length = _page_columns(
            local_offsets, remote_offsets, lengths
        )
        if table is not None and not (
            table.dtype == np.int64 and table.size == 3 * n and table.flags.c_contiguous
        ):
            raise ValueError(f"the table must be 3 x {n} contiguous int64s")
        return int(
            self._pages(
                local_column,
                remote_column,
                lengths_column,
                length,
                n,
                None if table is None else table.ctypes.data,
                local[0],
                local[1],
                remote[0],
                remote[1],
                int(reading),
                threads,
                bytes_per_thread,
            )
        )

    def copy_route(
        self,
        route: int,
        path: bytes,
        local_offsets: object,
        remote_offsets: object,
        lengths: object,
    ) -> int:
        """``copy_pages`` on a remembered shm route, its owner checked while the helpers copy.
        ``route``: the address of ROUTE_FIELDS int64s (local base and size, remote base and
        size, reading, threads, bytes per thread, the owner's pid, the inode of its file at
        ``path``), kept alive by the caller. Returns ``copy_pages``'s results, or ROUTE_STALE:
        the owner has exited or its file was replaced (the bytes moved through the old
        mapping, which no live owner reads).
        """
        n, local_column, remote_column, lengths_column, length = _page_columns(
            local_offsets, remote_offsets, lengths
        )
        return int(
            self._route(
                route,
                path,
                local_column,
                remote_column,
                lengths_column,
                length,
                n,
            )
        )

    def plan_pages(
        self,
        local_offsets: np.ndarray,
        remote_offsets: np.ndarray,
        lengths: np.ndarray | int,
        *,
        local: tuple[int, int],
        remote_size: int,
        max_length: int,
    ) -> tuple[np.ndarray, memoryview, np.ndarray, int] | int:
        """Check a page batch as ``copy_pages`` does (and refuse requests over ``max_length``
        bytes), then lay out its tcp frames: returns (the columns as an int64 [3, n] table,
        each request's (remote offset, length) as little-endian u64 pairs in bytes, the
        address of each request's local bytes, the total bytes), or ``-1 - i`` when request
        i is bad (nothing was laid out).
        """
        n, local_column, remote_column, lengths_column, length = _page_columns(
            local_offsets, remote_offsets, lengths
        )
        out = np.empty(6 * n, dtype=np.int64)  # table (3n), wire pairs (2n), addresses (n)
        address = out.ctypes.data
        total = int(
            self._plan(
                local_column,
                remote_column,
                lengths_column,
                length,
                n,
                local[0],
                local[1],
                remote_size,
                max_length,
                address,
                address + 24 * n,
                address + 40 * n,
            )
        )
        if total < 0:
            return total
        wire = out[3 * n : 5 * n].data.cast("B")
        return out[: 3 * n].reshape(3, n), wire, out[5 * n :], total

    def check_wire(
        self, pairs: bytes, *, frame_length: int, base: int, size: int
    ) -> tuple[np.ndarray, np.ndarray] | int:
        """A received frame's range table (``len(pairs) // 16`` little-endian u64 pairs of
        offset and length) against a segment of ``size`` bytes at address ``base``: returns
        (each range's address, its length) as int64 arrays; -1 when the lengths do not add up
        to ``frame_length``; ``-2 - i`` when range i lies outside the segment.
        """
        count = len(pairs) // 16
        out = np.empty(2 * count, dtype=np.int64)
        address = out.ctypes.data
        status = int(
            self._check_wire(pairs, count, frame_length, base, size, address, address + 8 * count)
        )
        if status < 0:
            return status
        return out[:count], out[count:]

    def serve_frame(
        self,
        fd: int,
        segments: tuple[int, int],
        names: bytes,
        *,
        generation: int,
        expected: int,
        scratch: Scratch,
        poll_s: float,
    ) -> int:
        """Wait for the next frame on socket ``fd`` and serve it if it is a WRITE, WRITEV or
        READ of one of ``segments`` (the address and count of contiguous int64 rows: base
        address, size, read-only, offset of the name in ``names``, its length).
        ``generation``: the address of an int64 that must still equal ``expected`` before any
        byte moves; ``scratch``: SERVE_SCRATCH bytes and three results (SERVE_DONE: the
        payload's bytes, the request id, the FrameOp served; SERVE_PUNT: the bytes left in the
        buffer). Returns a SERVE_* status; OSError on a socket error. The caller keeps every
        segment's memory mapped during the call.
        """
        if scratch.buffer.size < SERVE_SCRATCH or scratch.out.size < 3:
            raise ValueError("scratch must hold SERVE_SCRATCH bytes and three results")
        status = int(
            self._serve_frame(
                fd,
                segments[0],
                segments[1],
                names,
                generation,
                expected,
                scratch.buffer_address,
                int(poll_s * 1e9),
                scratch.out_address,
            )
        )
        if status < 0:
            raise OSError(-status, os.strerror(-status))
        return status

    def send_parallel(self, units: np.ndarray, *, deadline: float) -> None:
        """Send one frame on each of several sockets at once, on the copier's helper threads:
        ``units`` is int64 [n, SEND_UNIT] (socket, head address, head length, page count, the
        addresses of its page address and length arrays, status). Each unit's status becomes
        0, -ETIMEDOUT (``deadline``, a time.monotonic() value, passed first) or -errno. The
        caller keeps every buffer alive and owns each socket's sending during the call.
        """
        if not (
            units.dtype == np.int64
            and units.ndim == 2
            and units.shape[1] == SEND_UNIT
            and units.flags.c_contiguous
        ):
            raise ValueError(f"units must be contiguous int64 rows of {SEND_UNIT}")
        # time.monotonic() is CLOCK_MONOTONIC on Linux, the clock the C side reads.
        self._send_parallel(units.ctypes.data, len(units), int(deadline * 1e9))

    def send_pages(
        self,
        local_offsets: np.ndarray,
        remote_offsets: np.ndarray,
        lengths: np.ndarray | int,
        *,
        local: tuple[int, int],
        remote_size: int,
        max_length: int,
        name: bytes,
        conns: Sequence[tuple[int, int]],
        deadline: float,
    ) -> tuple[int, list[int]]:
        """Check a page WRITE as ``plan_pages`` does and send it as one WRITEV frame of
        segment ``name`` per connection of ``conns`` (socket, request id), all at once;
        connection c carries requests c * ceil(n / k) onwards. Returns the total bytes (or
        ``-1 - i`` when request i is bad, SEND_PAGES_REFUSED: nothing sent either way) and
        each connection's status: 0, -ETIMEDOUT (``deadline``, time.monotonic(), passed
        first) or -errno. The caller owns each socket's sending during the call.
        """
        n, local_column, remote_column, lengths_column, length = _page_columns(
            local_offsets, remote_offsets, lengths
        )
        k = len(conns)
        rows = (ctypes.c_int64 * (SEND_PAGES_CONN * k))()  # socket, request id, status
        rows[0::SEND_PAGES_CONN] = [fd for fd, _ in conns]
        rows[1::SEND_PAGES_CONN] = [request_id for _, request_id in conns]
        total = self._send_pages(
            local_column,
            remote_column,
            lengths_column,
            length,
            n,
            local[0],
            local[1],
            remote_size,
            max_length,
            name,
            len(name),
            rows,
            k,
            int(deadline * 1e9),
        )
        return total, rows[2::SEND_PAGES_CONN]

    def await_replies(self, fd: int, slots: ReplySlots, *, scratch: Scratch) -> int:
        """Wait for replies on socket ``fd``, taking each OK without payload to an armed slot
        of ``slots`` (see ReplySlots). Returns REPLY_PUNT (the bytes of a reply for Python
        are left in ``scratch``, of REPLY_SCRATCH bytes), REPLY_IDLE (the socket's tick passed)
        or REPLY_EOF; OSError on a socket error.
        """
        status = int(
            self._await_replies(
                fd,
                slots.ids_address,
                slots.states_address,
                len(slots.ids),
                scratch.buffer_address,
                scratch.out_address,
            )
        )
        if status < 0:
            raise OSError(-status, os.strerror(-status))
        return status

    def lane_call(
        self,
        fd: int,
        head: bytes,
        *,
        payload: int,
        payload_len: int,
        dest: int,
        dest_len: int,
        request_id: int,
        poll_s: float,
        deadline: float,
        scratch: Scratch,
    ) -> int:
        """Send one frame on socket ``fd`` (``head``, then ``payload_len`` bytes at address
        ``payload``) and take its reply: an OK to ``request_id`` with ``dest_len`` bytes,
        received at address ``dest``, is LANE_DONE. Else LANE_PUNT (the bytes of the reply read so
        far are left in ``scratch``, of LANE_SCRATCH bytes), LANE_TIMEOUT (``deadline``, in
        time.monotonic() seconds, passed) or LANE_EOF; OSError on a socket error.
        """
        status = int(
            self._lane_call(
                fd,
                head,
                len(head),
                payload,
                payload_len,
                dest,
                dest_len,
                request_id,
                int(poll_s * 1e9),
                int(deadline * 1e9),
                scratch.buffer_address,
                scratch.out_address,
            )
        )
        if status < 0:
            raise OSError(-status, os.strerror(-status))
        return status

    def finish_slot(self, slots: ReplySlots, index: int, state: int) -> bool:
        """Move slot ``index`` from ARMED to ``state`` and wake its waiter; False if it was not
        armed any more (the other side decided first)."""
        return bool(self._finish_slot(slots.states_address + 4 * index, state))

    def wait_slot(self, slots: ReplySlots, index: int, *, deadline: float) -> int:
        """Wait until slot ``index`` leaves ARMED or ``deadline`` (time.monotonic()) passes;
        returns its state then."""
        return int(self._wait_slot(slots.states_address + 4 * index, int(deadline * 1e9)))

    def hash_ranges(
        self,
        dsts: np.ndarray | None,
        srcs: np.ndarray,
        lengths: np.ndarray,
        *,
        threads: int,
        stream: bool = False,
    ) -> np.ndarray:
        """The KVH-64 digest of each range ``srcs[i]`` of ``lengths[i]`` bytes (uint64 array);
        with ``dsts``, each range is copied there on the way (the source is read once). Shared
        with up to ``threads - 1`` helpers by 64 KiB blocks. Ranges must be checked by the caller.
        """
        srcs, lengths = _int64s(srcs), _int64s(lengths)
        n = _same_length(srcs, lengths)
        if dsts is not None:
            dsts = _int64s(dsts)
            _same_length(dsts, srcs)
        out = np.empty(n, dtype=np.uint64)
        used = self._hash(
            None if dsts is None else dsts.ctypes.data,
            srcs.ctypes.data,
            lengths.ctypes.data,
            n,
            threads,
            int(stream),
            out.ctypes.data,
        )
        if used < 0:
            raise MemoryError(f"no memory for the block table of {n} ranges")
        return out

    def hash_copy(self, dst: int, src: int, length: int, *, threads: int, stream: bool) -> int:
        """``hash_ranges`` of one range given as addresses (``dst`` 0: digest only)."""
        return int(self._hash_copy(dst, src, length, threads, int(stream)))

    def send_ranges(
        self, fd: int, addresses: np.ndarray, lengths: np.ndarray, done: ctypes.c_int64
    ) -> bool:
        """Send the checked ranges in order on socket ``fd``, resuming after ``done`` bytes
        (updated). True once all are sent; False when the socket's timeout passed first (call
        again); OSError on a socket error.
        """
        addresses, lengths = _int64s(addresses), _int64s(lengths)
        n = _same_length(addresses, lengths)
        status = self._send(fd, addresses.ctypes.data, lengths.ctypes.data, n, ctypes.byref(done))
        return _finished(status)

    def recv_ranges(
        self,
        fd: int,
        addresses: np.ndarray,
        lengths: np.ndarray,
        done: ctypes.c_int64,
        *,
        buffered_address: int = 0,
        buffered_bytes: int = 0,
    ) -> bool:
        """Fill the checked ranges in order: the first ``buffered_bytes`` from
        ``buffered_address`` (bytes already read from the socket), the rest from socket ``fd``;
        resumes after ``done`` bytes (updated). True once all arrived; False when the socket's
        timeout passed first (call again); OSError on a socket error, EOFError when the peer
        closed the connection.
        """
        addresses, lengths = _int64s(addresses), _int64s(lengths)
        n = _same_length(addresses, lengths)
        status = self._recv(
            fd,
            addresses.ctypes.data,
            lengths.ctypes.data,
            n,
            buffered_address,
            buffered_bytes,
            ctypes.byref(done),
        )
        if status == 1:
            raise EOFError(f"connection closed after {done.value} bytes")
        return _finished(status)


_INT64 = np.dtype(np.int64)


def _page_columns(
    local_offsets: object, remote_offsets: object, lengths: object
) -> tuple[int, bytes, bytes, bytes | None, int]:
    """(n, the offset columns' bytes, the lengths column's bytes or None, the one length or 0)
    of a page batch's columns; ValueError unless each is n contiguous int64s (numpy arrays:
    lists are refused too) and ``lengths`` such a column or an int. The C side reads n int64s
    from each (ctypes passes a bytes object's own buffer). Attribute checks only, in one frame:
    this runs per KV handoff, right after other big copies have made every Python step slow
    (issue #3). A copy of the column is cheaper there than its address: ``.ctypes.data`` runs
    numpy's Python-level ctypes wrapper, 25-50 us for two columns right after a 64 MiB copy
    on the 2-core box, ``tobytes`` 6-13 us."""
    scalar = isinstance(lengths, int)
    columns = (
        (local_offsets, remote_offsets) if scalar else (local_offsets, remote_offsets, lengths)
    )
    n = len(local_offsets) if type(local_offsets) is np.ndarray else -1
    raw: list[bytes] = []
    for column in columns:
        if not (
            type(column) is np.ndarray
            and column.dtype == _INT64
            and column.ndim == 1
            and column.flags.c_contiguous
            and len(column) == n
        ):
            raise ValueError(f"page columns must be {n} contiguous int64s each")
        raw.append(column.tobytes())
    if isinstance(lengths, int):
        return n, raw[0], raw[1], None, lengths
    return n, raw[0], raw[1], raw[2], 0


def _same_length(*arrays: np.ndarray) -> int:
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"range arrays of unequal lengths {[len(a) for a in arrays]}")
    return n


def _finished(status: int) -> bool:
    """0: done; -EAGAIN/-EWOULDBLOCK (the socket's timeout tick) or -EINTR: not yet; -errno."""
    if status == 0:
        return True
    code = -status
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
        return False
    raise OSError(code, os.strerror(code))


def _compiler_identity(argv: list[str]) -> str:
    """What names the compiler in the cache key: its resolved path, size and mtime."""
    found = shutil.which(argv[0])
    if found is None:
        raise NativeUnavailable(f"no C compiler {argv[0]!r} on PATH")
    info = os.stat(found)
    return f"{' '.join(argv)}|{os.path.realpath(found)}|{info.st_size}|{info.st_mtime_ns}"


def _libc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return ""


def _private_dir(path: str) -> None:
    """Create ``path`` (0700) or check that only this user can write to it: we load code from it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeUnavailable(
            f"cache directory {path} is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}); set "
            f"{_env.CACHE_DIR_VAR} to a private directory"
        )


def build(*, cache_dir: str, compiler: str) -> NativeCopier:
    """Build ``_copy.c`` with ``compiler`` into ``cache_dir`` unless already there; load it.

    The file name hashes the source, flags, compiler and platform, so a changed source or a
    home directory shared by other machines never loads a stale or foreign library. Many
    processes may build at once: each compiles to its own temporary file and renames it into
    place (atomic), so a reader sees a whole library or none. Raises NativeUnavailable.
    """
    argv = shlex.split(compiler)
    if not argv:
        raise NativeUnavailable("empty compiler command")
    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        raise NativeUnavailable(f"cannot read {SOURCE}: {exc}") from exc
    key = hashlib.sha256()
    for part in (
        source,
        " ".join(_FLAGS).encode(),
        _compiler_identity(argv).encode(),
        f"{sys.platform}|{platform.machine()}|{_libc()}".encode(),
    ):
        key.update(part)
        key.update(b"\0")
    path = os.path.join(cache_dir, f"copy-{key.hexdigest()[:20]}.so")
    try:
        _private_dir(cache_dir)
        if not os.path.exists(path):
            _compile(argv, path)
        return NativeCopier(path)
    except OSError as exc:  # a full disk, a read-only home, a library the loader refuses
        raise NativeUnavailable(f"{path}: {exc}") from exc


def _compile(argv: list[str], path: str) -> None:
    temporary = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    command = [*argv, *_FLAGS, "-o", temporary, str(SOURCE)]
    try:
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise NativeUnavailable(
                f"{shlex.join(command)} ran past {_COMPILE_TIMEOUT_S:g} s"
            ) from None
        if done.returncode != 0:
            raise NativeUnavailable(
                f"{shlex.join(command)} exited with {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        os.replace(temporary, path)
        logger.info("built the native data path: %s", path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


_lock = threading.Lock()
_loaded: list[NativeCopier | None] = []  # empty until the first load() decides


def load() -> NativeCopier | None:
    """The native library, built on first call; None (logged once) where it cannot be used."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            native = _load()
            if native is not None:
                native.set_helper_spin(HELPER_SPIN_S if _spare_cores() else 0.0)
            _loaded.append(native)
        return _loaded[0]


# Helpers poll this long for the next job before parking (see kvstack_set_helper_spin), where
# cores are plenty: on a small box a polling helper would take the CPU the next copy's caller,
# or its peer process, needs.
HELPER_SPIN_S = 200e-6
_SPIN_MIN_CORES = 8


def _spare_cores() -> bool:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores >= _SPIN_MIN_CORES


def _load() -> NativeCopier | None:
    try:
        enabled = _env.native_copy()
    except ConfigError as exc:  # a copy is no place to raise a configuration error
        logger.warning("native data path off: %s", exc)
        return None
    if not enabled:
        logger.info(
            "native data path turned off by %s: host copies and tcp page frames take the "
            "Python path (one ctypes.memmove or memoryview per range)",
            _env.NATIVE_COPY_VAR,
        )
        return None
    reasons: list[str] = []
    for compiler in _env.compilers():
        try:
            return build(cache_dir=_env.cache_dir(), compiler=compiler)
        except NativeUnavailable as exc:
            reasons.append(str(exc))
    logger.warning(
        "native data path unavailable, host copies and tcp page frames take the Python path "
        "(one ctypes.memmove or memoryview per range; slower for page batches): %s",
        "; ".join(reasons),
    )
    return None


def forget() -> None:
    """Drop the decision of ``load()`` so the next call decides again (tests that change the
    environment). A library already loaded stays mapped: a copy may still be running in it.
    """
    with _lock:
        _loaded.clear()
