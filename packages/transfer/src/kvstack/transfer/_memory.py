"""Local memory: segments (what a buffer becomes when registered), POSIX shared memory, copies.

Host memory is always handled as a 1-D ``uint8`` numpy view, copied by address with the GIL
released (the native range copier of ``_native``, else ``ctypes.memmove``); CUDA memory as a
1-D ``uint8`` torch view.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import mmap
import os
import secrets
import shutil
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstack.transfer import _env, _native
from kvstack.transfer.errors import InvalidRequest, OutOfBounds, SegmentReadOnly

if TYPE_CHECKING:
    import torch

__all__ = [
    "LocalSegment",
    "ShmRegion",
    "copy_host",
    "copy_host_many",
    "copy_region",
    "host_id",
    "is_alive",
    "torch_or_none",
]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"  # noqa: S108 -- where POSIX shared memory lives, not a temp dir
_SHM_PREFIX = "kvstack-"


def torch_or_none() -> Any:
    """The torch module if the process already imported it (a tensor cannot exist otherwise)."""
    return sys.modules.get("torch")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_HOST_ID = f"{socket.gethostname()}/{_boot_id()}"
_HOST_TAG = hashlib.sha256(_HOST_ID.encode()).hexdigest()[:8]


def host_id() -> str:
    """Equal in two processes iff they share a kernel (hostname + boot id)."""
    return _HOST_ID


def is_alive(pid: int) -> bool:
    """Whether a process of this host is alive (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# madvise advice of Linux 5.14+ (Python 3.11's mmap module does not name them): fault a range's
# pages in now, for reading or writing, instead of one fault per 4 KiB page on first touch.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23
# Populated this much per madvise call: a background populate yields to the process between.
_POPULATE_CHUNK_BYTES = 64 << 20


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise  # a CDLL call releases the GIL
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise() if sys.platform == "linux" else None


def _check_room(size_bytes: int) -> None:
    """Refuse to commit more shared memory than /dev/shm or the host's available memory holds:
    committing it would fill the host's memory (and wake the OOM killer) before failing."""
    free = shutil.disk_usage(SHM_DIR).free
    available = free
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    if size_bytes > min(free, available):
        raise InvalidRequest(
            f"cannot commit {size_bytes} bytes of shared memory: {SHM_DIR} has {free} bytes "
            f"free and the host {available} bytes of memory available"
        )


class ShmRegion:
    """A file in /dev/shm mapped into this process (created by the owner, opened by peers)."""

    def __init__(self, name: str, size_bytes: int, *, fd: int, writable: bool) -> None:
        self.name = name
        self.size_bytes = size_bytes
        self.writable = writable
        # mmap cannot map 0 bytes: an empty segment is an empty array.
        self._mmap: mmap.mmap | None = None
        if size_bytes:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mmap = mmap.mmap(fd, size_bytes, access=access)
            self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        else:
            self.array = np.empty(0, dtype=np.uint8)
        self.address: int = self.array.ctypes.data

    @classmethod
    def create(cls, size_bytes: int, *, prefault: bool = False) -> ShmRegion:
        """A new file under /dev/shm named after this host and pid (see sweep_stale).

        Sparse (pages appear when touched) unless ``prefault``: then every page is allocated
        and mapped now, before this returns.
        """
        if prefault:
            _check_room(size_bytes)
        name = f"{_SHM_PREFIX}{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
            region = cls(name, size_bytes, fd=fd, writable=True)
            if prefault:
                region.populate(strict=True)
            return region
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def open(cls, name: str, size_bytes: int, *, writable: bool) -> ShmRegion:
        if "/" in name or not name.startswith(_SHM_PREFIX):
            raise InvalidRequest(f"shared memory name {name!r} is not a kvstack segment")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if writable else os.O_RDONLY)
        try:
            actual = os.fstat(fd).st_size
            if actual < size_bytes:
                raise InvalidRequest(
                    f"shared memory {name!r} holds {actual} bytes, metadata says {size_bytes}"
                )
            region = cls(name, size_bytes, fd=fd, writable=writable)
            # Every page of a fully allocated file (an owner that prefaulted: a store node)
            # exists: map them all, in the background, so copies into it take no page fault
            # (H200 box, first 1 MiB copy into a region: 363 us faulting, 57 us mapped). A
            # sparse file is left alone: populating it would allocate its holes.
            if os.fstat(fd).st_blocks * 512 >= size_bytes:
                threading.Thread(
                    target=region.populate, name="kvstack-transfer-populate", daemon=True
                ).start()
            return region
        finally:
            os.close(fd)

    def populate(self, *, strict: bool = False) -> None:
        """Fault in every page of the mapping (allocating the file's holes, if writable).

        Without MADV_POPULATE_* (Linux < 5.14) pages keep faulting in on first touch, as they
        would anyway. ``strict`` (an owner committing its memory): memory that cannot be had
        now (a full /dev/shm) raises InvalidRequest, instead of a SIGBUS in whichever process
        first touches the missing page later.
        """
        if _madvise is None or not self.size_bytes:
            return
        advice = _MADV_POPULATE_WRITE if self.writable else _MADV_POPULATE_READ
        for start in range(0, self.size_bytes, _POPULATE_CHUNK_BYTES):
            length = min(_POPULATE_CHUNK_BYTES, self.size_bytes - start)
            if _madvise(self.address + start, length, advice) == 0:
                continue
            code = ctypes.get_errno()
            if strict and code != errno.EINVAL:  # EINVAL: this kernel cannot populate
                free = shutil.disk_usage(SHM_DIR).free
                raise InvalidRequest(
                    f"cannot commit {self.size_bytes} bytes of shared memory for {self.name}: "
                    f"{os.strerror(code)} after {start} bytes ({SHM_DIR} has {free} bytes free)"
                )
            logger.debug("populating %s stopped: %s", self.name, os.strerror(code))
            return

    def unlink(self) -> None:
        """Remove the file: no new peer can map it; existing mappings stay valid.

        The mapping itself is never closed explicitly: a copy on another thread may still hold
        its address (and the user may hold the array ``allocate`` returned). It is unmapped by
        the garbage collector once the last reference is gone.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))

    @staticmethod
    def exists(name: str) -> bool:
        return "/" not in name and os.path.exists(os.path.join(SHM_DIR, name))


def sweep_stale_shm() -> int:
    """Unlink shm files of dead processes of this host (a SIGKILLed owner cannot clean up)."""
    removed = 0
    prefix = f"{_SHM_PREFIX}{_HOST_TAG}-"
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not is_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
    if removed:
        logger.info("removed %d shared-memory segments of dead processes", removed)
    return removed


@dataclass(eq=False, slots=True)
class LocalSegment:
    """A registered region of this process: host memory (``host``) or CUDA memory (``cuda``)."""

    name: str
    size_bytes: int
    readonly: bool
    device: str  # "cpu" or "cuda:N"
    host: np.ndarray | None  # 1-D uint8 view of host memory
    cuda: Any  # 1-D uint8 torch view of CUDA memory, or None
    shm: ShmRegion | None
    keepalive: object  # the object the user registered, so its memory outlives us
    address: int = 0  # base address of ``host`` (for ctypes.memmove); 0 for CUDA
    published: bool = False  # peers may reach it (tensor helpers' private segments are not)

    def __post_init__(self) -> None:
        if self.host is not None:
            self.address = self.host.ctypes.data

    def check(self, offset: int, length: int, *, op: str, writing: bool) -> None:
        """``region()``'s checks without building a view (the per-request fast path)."""
        if offset + length > self.size_bytes:
            raise OutOfBounds(
                self.name, offset=offset, length=length, size_bytes=self.size_bytes, op=op
            )
        if writing and self.readonly:
            raise SegmentReadOnly(self.name)

    def region(self, offset: int, length: int, *, op: str, writing: bool) -> Any:
        """The bytes [offset, offset + length) as a host array or CUDA tensor, bounds-checked."""
        if offset + length > self.size_bytes:
            raise OutOfBounds(
                self.name, offset=offset, length=length, size_bytes=self.size_bytes, op=op
            )
        if writing and self.readonly:
            raise SegmentReadOnly(self.name)
        if self.host is not None:
            return self.host[offset : offset + length]
        return self.cuda[offset : offset + length]

    def close(self) -> None:
        """Withdraw the segment. Its memory stays valid for in-flight copies (see unlink)."""
        if self.shm is not None:
            self.shm.unlink()


def segment_from_buffer(name: str, buffer: object) -> LocalSegment:
    """Wrap a bytes-like object, numpy array or torch tensor (CPU or CUDA) without copying."""
    torch = torch_or_none()
    if torch is not None and isinstance(buffer, torch.Tensor):
        return _segment_from_tensor(name, buffer)
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise InvalidRequest(
                f"segment {name!r}: numpy array of shape {buffer.shape} is not C-contiguous"
            )
        array = buffer.reshape(-1).view(np.uint8)
        readonly = not buffer.flags.writeable
    else:
        try:
            view = memoryview(buffer)  # pyrefly: ignore[bad-argument-type] -- checked at runtime
        except TypeError:
            raise InvalidRequest(
                f"segment {name!r}: cannot register {type(buffer).__name__}; expected a "
                "bytes-like object, numpy array or torch tensor"
            ) from None
        if not view.c_contiguous:
            raise InvalidRequest(f"segment {name!r}: buffer is not contiguous")
        array = np.frombuffer(view.cast("B") if view.format != "B" else view, dtype=np.uint8)
        readonly = view.readonly
    return LocalSegment(
        name=name,
        size_bytes=array.nbytes,
        readonly=readonly,
        device="cpu",
        host=array,
        cuda=None,
        shm=None,
        keepalive=buffer,
    )


def _segment_from_tensor(name: str, tensor: torch.Tensor) -> LocalSegment:
    if not tensor.is_contiguous():
        raise InvalidRequest(
            f"segment {name!r}: tensor of shape {tuple(tensor.shape)} is not contiguous"
        )
    flat = tensor.detach().reshape(-1).view(sys.modules["torch"].uint8)
    if tensor.is_cuda:
        return LocalSegment(
            name=name,
            size_bytes=flat.numel(),
            readonly=False,
            device=f"cuda:{tensor.device.index}",
            host=None,
            cuda=flat,
            shm=None,
            keepalive=tensor,
        )
    if tensor.device.type != "cpu":
        raise InvalidRequest(f"segment {name!r}: tensors on {tensor.device} are not supported")
    return LocalSegment(
        name=name,
        size_bytes=flat.numel(),
        readonly=False,
        device="cpu",
        host=flat.numpy(),
        cuda=None,
        shm=None,
        keepalive=tensor,
    )


def shm_segment(name: str, size_bytes: int, *, prefault: bool = False) -> LocalSegment:
    region = ShmRegion.create(size_bytes, prefault=prefault)
    return LocalSegment(
        name=name,
        size_bytes=size_bytes,
        readonly=False,
        device="cpu",
        host=region.array,
        cuda=None,
        shm=region,
        keepalive=None,
    )


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what taskset or a container's cpuset allows
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Host copies go through the native range copier (_native, _copy.c): one GIL-free call per
# batch, shared by bytes with up to _NATIVE_THREADS - 1 parked helper threads, one thread per
# _BYTES_PER_THREAD of the batch. Waking a helper costs ~5 us (2-core CI box), so a thread pays
# from a few hundred KiB. Capped at 8 unless KVSTACK_TRANSFER_COPY_THREADS says otherwise: every
# process that copies keeps its helpers, polling between copies, and leaves the rest of the
# cores to the process's own threads (see _env.COPY_THREADS_VAR for what more threads gain).
_NATIVE_THREADS = _env.copy_threads(max(1, min(8, _usable_cores())))
_BYTES_PER_THREAD = 256 << 10
# KVH-64 (hashing, or copying and hashing) is bound by compute, not memory: 6-8 GB/s per core
# on the H100/H200 machines' Xeons. It takes up to 16 threads, one per 128 KiB: 64 x 1 MiB
# copied and hashed in 1.44-1.54 ms on 8 threads, 0.80 ms on 16 (H100). A lone 1 MiB gains
# little past 8: into a node's segment on an H200 machine, p50 1 thread 98 us, 2 56-66, 4
# 43-48, 8 41-44, 16 54. Inside a store put loop (master and node busy on the same cores),
# with helpers that poll between jobs (_copy.c), 8 threads gave puts p50 107-122 us, 4
# 111-122, 16 122-141 (two runs, side by side); 16 also slowed the master's reply.
_HASH_THREADS = max(1, min(16, _usable_cores()))
_HASH_BYTES_PER_THREAD = 128 << 10
# A single range is shared with helpers from this size. Into a prefaulted shm mapping: on the
# 2-core CI box 1 MiB took 83-96 us on 2 threads, 46-49 on one (waking a helper on the other,
# busy vCPU costs), 4 MiB (streaming) 124-135 on two, 160-172 on one; on the H200 box's 16
# cores 1 MiB streamed at 13.9 GB/s on one thread, 23.0 on four. Shorter ones are one
# ctypes.memmove (a cheaper call than the native copier's, 2.7 vs 4.4 us), unless streaming.
SHARED_COPY_BYTES = (512 << 10) if _NATIVE_THREADS >= 8 else (2 << 20)
# Streaming copies from this size (the native copier's STREAM_MIN).
STREAM_COPY_BYTES = 64 << 10


def _native_threads(total_bytes: int) -> int:
    return max(1, min(_NATIVE_THREADS, total_bytes // _BYTES_PER_THREAD))


def hash_threads(total_bytes: int) -> int:
    """Threads for a KVH-64 pass over ``total_bytes`` (see _HASH_THREADS)."""
    return max(1, min(_HASH_THREADS, total_bytes // _HASH_BYTES_PER_THREAD))


def native_thread_policy() -> tuple[int, int]:
    """(most threads, bytes per thread) of a native copy, for callers whose totals the native
    side computes itself (NativeCopier.copy_pages)."""
    return _NATIVE_THREADS, _BYTES_PER_THREAD


# Without the native copier (no C compiler, KVSTACK_TRANSFER_NATIVE_COPY=0): one memcpy thread
# cannot saturate memory bandwidth, so big host copies are cut into chunks that the caller and
# named worker threads take in turn (ctypes.memmove drops the GIL). Taking chunks dynamically,
# not fixed halves, keeps a copy fast when another process holds a core. Measured on the 2-core
# CI box, 64 MiB shm->shm: 9.5 GB/s with one thread, 13.5 GB/s with two.
_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
PARALLEL_COPY_BYTES = 8 << 20
_CHUNK_BYTES = 2 << 20
_copy_pools: list[ThreadPoolExecutor] = []  # at most one, created on first big copy
_copy_pool_lock = threading.Lock()


def _copy_pool() -> ThreadPoolExecutor:
    with _copy_pool_lock:
        if not _copy_pools:
            _copy_pools.append(
                ThreadPoolExecutor(_COPY_THREADS - 1, thread_name_prefix="kvstack-transfer-copy")
            )
        return _copy_pools[0]


def _share(chunks: int, copy_chunk: Callable[[int], None]) -> None:
    """Run copy_chunk(0..chunks-1) on this thread and the copy threads, first come first served."""
    counter = itertools.count()  # next() is atomic under the GIL

    def worker() -> None:
        for index in iter(counter.__next__, None):
            if index >= chunks:
                return
            copy_chunk(index)

    helpers = min(_COPY_THREADS - 1, chunks - 1)
    futures = [_copy_pool().submit(worker) for _ in range(helpers)]
    worker()
    for future in futures:
        # A helper still queued (the copy threads are busy with another caller's copy) has
        # taken no chunk: drop it rather than wait for a thread to free up. Several threads
        # copying at once (the store's verified batch reads) otherwise queue behind each other.
        if not future.cancel():
            future.result()


# Fallback for many ranges (a KV handoff: hundreds of 16 KiB pages): shared with the copy
# threads from this many bytes, cut by bytes (not by count) into chunks of about
# _RANGES_CHUNK_BYTES so that every copy thread takes some. Each range is one ctypes.memmove
# that drops and retakes the GIL, so threads contend for it once per page. Measured on the
# 2-core CI box (256 x 16 KiB, caches flushed): serial 440 us, shared with one copy thread
# 540 us, at 1 MiB 100 vs 160 us; so with fewer than 4 cores page batches stay on the calling
# thread.
PARALLEL_RANGES_BYTES = 1 << 20
_RANGES_CHUNK_BYTES = 512 << 10
_RANGES_MIN_AVERAGE_BYTES = 256 << 10
_RANGES_THREADS = _COPY_THREADS if (os.cpu_count() or 1) >= 4 else 1


def coalesce(
    dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive ranges that continue each other on both sides into one range.

    ``dsts``/``srcs`` are int64 addresses (or offsets), ``lengths`` int64 byte counts. Order is
    kept; a run of pages that is contiguous locally and remotely becomes one memmove.
    """
    if len(lengths) < 2:
        return dsts, srcs, lengths
    ends = lengths[:-1]
    joined = (dsts[1:] == dsts[:-1] + ends) & (srcs[1:] == srcs[:-1] + ends)
    if not joined.any():
        return dsts, srcs, lengths
    starts = np.flatnonzero(np.concatenate(([True], ~joined)))
    return dsts[starts], srcs[starts], np.add.reduceat(lengths, starts)


def _pieces(
    dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray, piece_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut ranges longer than ``piece_bytes`` into pieces of at most that (empty ranges go)."""
    counts = -(-lengths // piece_bytes)
    index = np.repeat(np.arange(len(lengths)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(len(index)) - first) * piece_bytes
    return dsts[index] + start, srcs[index] + start, np.minimum(lengths[index] - start, piece_bytes)


def memcpy_ranges(
    dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray, *, stream: bool = False
) -> None:
    """Copy checked ranges ``dsts[i] <- srcs[i]`` of ``lengths[i]`` bytes (int64 arrays of
    addresses and byte counts); shared with helper threads by bytes when large. ``stream``:
    see ``memcpy``.

    Ranges adjacent on both sides are copied as one. Destinations should not overlap: a large
    copy runs its pieces in no particular order.
    """
    copier = _native.load()
    if copier is not None:
        threads = _native_threads(int(lengths.sum()))
        copier.copy_ranges(dsts, srcs, lengths, threads=threads, stream=stream)
        return
    _memcpy_ranges_python(dsts, srcs, lengths)


def _memcpy_ranges_python(dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray) -> None:
    """``memcpy_ranges`` without the native copier: one ctypes.memmove per range."""
    dsts, srcs, lengths = coalesce(dsts, srcs, lengths)
    memmove = ctypes.memmove
    total = int(lengths.sum())
    # Small ranges stay on this thread whatever the core count: one GIL handoff per 16 KiB page
    # made 256 scattered pages 4x slower on 4 copy threads (H200 box, 16 cores: 1.1 vs 4.0
    # GB/s). Threads pay for long ranges (a KV handoff's runs of adjacent blocks).
    if (
        _RANGES_THREADS == 1
        or total < PARALLEL_RANGES_BYTES
        or total < len(lengths) * _RANGES_MIN_AVERAGE_BYTES
    ):
        for dst, src, n in zip(dsts.tolist(), srcs.tolist(), lengths.tolist(), strict=True):
            memmove(dst, src, n)  # one C call per range; the GIL is released inside
        return
    if int(lengths.max()) > _RANGES_CHUNK_BYTES:  # a few big ranges: share them out too
        dsts, srcs, lengths = _pieces(dsts, srcs, lengths, _RANGES_CHUNK_BYTES)
    ends = np.cumsum(lengths)
    chunks = min(len(lengths), -(-total // _RANGES_CHUNK_BYTES))
    # Chunk k holds the ranges that end in (k/chunks, (k+1)/chunks] of the bytes.
    cuts = np.searchsorted(ends, np.arange(1, chunks) * (total // chunks), side="right")
    bounds = [0, *np.unique(cuts[(cuts > 0) & (cuts < len(lengths))]).tolist(), len(lengths)]
    dst_list, src_list, length_list = dsts.tolist(), srcs.tolist(), lengths.tolist()

    def copy_chunk(index: int) -> None:
        lo, hi = bounds[index], bounds[index + 1]
        for dst, src, n in zip(dst_list[lo:hi], src_list[lo:hi], length_list[lo:hi], strict=True):
            memmove(dst, src, n)

    _share(len(bounds) - 1, copy_chunk)


def memcpy_many(
    dsts: list[int], srcs: list[int], lengths: list[int], *, stream: bool = False
) -> None:
    """``memcpy_ranges`` for lists of addresses and lengths (caller buffers)."""
    memcpy_ranges(
        np.array(dsts, dtype=np.int64),
        np.array(srcs, dtype=np.int64),
        np.array(lengths, dtype=np.int64),
        stream=stream,
    )


def memcpy(dst: int, src: int, length: int, *, stream: bool = False) -> None:
    """Copy ``length`` bytes between two checked host addresses, in parallel when large.

    ``stream``: the destination's bytes will not be read by this process (a store put into a
    node's segment, a WRITE into a peer's): long copies bypass the cache instead of first
    reading each line into it.
    """
    threads = _native_threads(length) if length >= SHARED_COPY_BYTES else 1
    if threads > 1 or (stream and length >= STREAM_COPY_BYTES):
        copier = _native.load()
        if copier is not None:
            copier.copy_ranges(
                np.array([dst], dtype=np.int64),
                np.array([src], dtype=np.int64),
                np.array([length], dtype=np.int64),
                threads=threads,
                stream=stream,
            )
            return
    if length < PARALLEL_COPY_BYTES or _COPY_THREADS == 1:
        ctypes.memmove(dst, src, length)
        return

    def copy_chunk(index: int) -> None:
        start = index * _CHUNK_BYTES
        ctypes.memmove(dst + start, src + start, min(_CHUNK_BYTES, length - start))

    _share(-(-length // _CHUNK_BYTES), copy_chunk)


def copy_host(dst: np.ndarray, src: np.ndarray, *, stream: bool = False) -> None:
    """Copy host array ``src`` into ``dst`` (both C-contiguous, equal sizes in bytes) with the
    engine's own copier: the GIL released, helper threads for big copies, and with ``stream``
    stores that bypass the cache (for a destination this process will not read again, such as
    a store put into a node's segment mapped through ``Engine.map_segment``)."""
    _check_host_pair(dst, src)
    if dst.nbytes:
        memcpy(dst.ctypes.data, src.ctypes.data, dst.nbytes, stream=stream)


def copy_host_many(
    dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray], *, stream: bool = False
) -> None:
    """``copy_host`` of many pairs in one call, shared by bytes over the copier's threads (a
    store's batch read of same-host objects). Destinations must not overlap."""
    if len(dsts) != len(srcs):
        raise InvalidRequest(f"{len(srcs)} sources for {len(dsts)} destinations")
    for dst, src in zip(dsts, srcs, strict=True):
        _check_host_pair(dst, src)
    n = len(dsts)
    memcpy_ranges(
        np.fromiter((d.ctypes.data for d in dsts), dtype=np.int64, count=n),
        np.fromiter((s.ctypes.data for s in srcs), dtype=np.int64, count=n),
        np.fromiter((d.nbytes for d in dsts), dtype=np.int64, count=n),
        stream=stream,
    )


def _check_host_pair(dst: np.ndarray, src: np.ndarray) -> None:
    if dst.nbytes != src.nbytes:
        raise InvalidRequest(f"copy of {src.nbytes} bytes into {dst.nbytes}")
    if not (dst.flags.c_contiguous and src.flags.c_contiguous and dst.flags.writeable):
        raise InvalidRequest("copy_host needs C-contiguous arrays and a writable destination")


def copy_region(dst: Any, src: Any) -> None:
    """Copy src into dst (same length): host arrays or CUDA tensors, in any combination."""
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        if dst.nbytes != src.nbytes:
            raise InvalidRequest(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        memcpy(dst.ctypes.data, src.ctypes.data, dst.nbytes)
        return
    torch = sys.modules["torch"]
    if isinstance(dst, np.ndarray) or isinstance(src, np.ndarray):
        with warnings.catch_warnings():
            # A read-only source (a read-only segment) is only read: torch's warning does not
            # apply.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            dst_t = torch.from_numpy(dst) if isinstance(dst, np.ndarray) else dst
            src_t = torch.from_numpy(src) if isinstance(src, np.ndarray) else src
    else:  # GPU to GPU: no warning filters to copy and restore around a 1 GiB copy's launch
        dst_t, src_t = dst, src
    if dst_t.numel() == 0:
        return
    dst_t.copy_(src_t)
    device = dst_t.device if dst_t.is_cuda else src_t.device
    # The copy is queued on the current stream; "done" must mean the bytes are there.
    torch.cuda.current_stream(device).synchronize()
