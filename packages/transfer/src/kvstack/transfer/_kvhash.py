"""KVH-64: a 64-bit digest of host bytes that threads can split and a copy can compute.

The store checks every object's bytes against a digest its writer computed (issue #4). XXH3-64
hashed cold bytes at 7.5 GB/s per core on the H200 machines' Xeons, so a put or a verified read
spent more time hashing than copying. KVH-64 hashes 64 KiB blocks independently and sums their
mixed values, so the native data path (``_copy.c``, where the definition is written out) hashes
blocks on several threads and inside the copy loop, reading the source once.

This module holds the public functions and the same digest in numpy: the reference the tests
compare the native one against, and the path where the native library is unavailable (no C
compiler, or ``KVSTACK_TRANSFER_NATIVE_COPY=0``), a few times slower than XXH3.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from kvstack.transfer import _native
from kvstack.transfer._memory import (
    SHARED_COPY_BYTES,
    _check_host_pair,
    copy_host,
    copy_host_many,
    hash_threads,
)
from kvstack.transfer.errors import InvalidRequest

__all__ = [
    "bytes_hashed",
    "copy_host_hashed",
    "copy_host_many_hashed",
    "kvhash64",
    "kvhash64_many",
    "native_hashing",
]

# The constants of _copy.c's KVH-64 (see the definition there).
BLOCK = 64 << 10
_K0 = 0x243F6A8885A308D3
_STEP = 0x9E3779B97F4A7C15
_J = 0xD6E8FEB86659FD93
_SEED = 0x6B76737461636B31
_MASK32 = np.uint64(0xFFFFFFFF)
_WORDS = BLOCK // 8
# The reference hashes this many blocks per numpy pass (bounds its temporaries to ~4 MiB).
_GROUP_BLOCKS = 16


def _u64(value: int) -> np.uint64:
    return np.uint64(value & 0xFFFFFFFFFFFFFFFF)


with np.errstate(over="ignore"):
    _KEYS = np.arange(1, _WORDS + 1, dtype=np.uint64) * _u64(_STEP) + _u64(_K0)


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, element-wise (wrapping uint64 arithmetic)."""
    h = h ^ (h >> np.uint64(33))
    h = h * _u64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * _u64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _terms(words: np.ndarray, lengths: np.ndarray, first_block: int) -> np.ndarray:
    """The terms of blocks given as rows of uint64 words (zero-padded), byte lengths per row."""
    keys = _KEYS[: words.shape[1]]
    d = words ^ keys
    a = ((d & _MASK32) * (d >> np.uint64(32))).sum(axis=1, dtype=np.uint64)
    s = words.sum(axis=1, dtype=np.uint64)
    block = _fmix(a ^ _fmix(s ^ (lengths.astype(np.uint64) * _u64(_STEP))))
    index = np.arange(first_block + 1, first_block + 1 + len(words), dtype=np.uint64)
    return _fmix(block + index * _u64(_J))


def kvhash64_reference(data: object) -> int:
    """KVH-64 of ``data``'s bytes (any C-contiguous buffer) in numpy: no native code."""
    raw = _bytes_of(data)
    n = raw.size
    total = np.zeros(1, dtype=np.uint64)
    full = n // BLOCK
    with np.errstate(over="ignore"):
        for start in range(0, full, _GROUP_BLOCKS):
            count = min(_GROUP_BLOCKS, full - start)
            words = raw[start * BLOCK : (start + count) * BLOCK].view("<u8").reshape(count, _WORDS)
            lengths = np.full(count, BLOCK, dtype=np.uint64)
            total += _terms(words, lengths, start).sum(dtype=np.uint64)
        tail = n - full * BLOCK
        if tail:
            padded = np.zeros(-(-tail // 8) * 8, dtype=np.uint8)
            padded[:tail] = raw[full * BLOCK :]
            words = padded.view("<u8").reshape(1, -1)
            total += _terms(words, np.array([tail], dtype=np.uint64), full)[0]
        digest = _fmix(total ^ _fmix(np.array([n], dtype=np.uint64) ^ _u64(_SEED)))
    return int(digest[0])


def _bytes_of(data: object) -> np.ndarray:
    """``data``'s bytes as a flat uint8 array (no copy); InvalidRequest if it has none."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise InvalidRequest("KVH-64 needs C-contiguous bytes: pass a contiguous array")
        return data.reshape(-1).view(np.uint8)
    try:
        view = memoryview(data)  # pyrefly: ignore[bad-argument-type] -- any object: TypeError below
    except TypeError:
        raise InvalidRequest(
            f"KVH-64 of a {type(data).__name__}: pass bytes, a buffer or a numpy array"
        ) from None
    if not view.c_contiguous:
        raise InvalidRequest("KVH-64 needs C-contiguous bytes: pass a contiguous buffer")
    return np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, np.uint8)


def native_hashing() -> bool:
    """Whether KVH-64 runs natively here (fast); without it, ``kvhash64`` is the numpy
    reference, several times slower than XXH3-64 (the store's writers then pick XXH3-64)."""
    return _native.load() is not None


def _threads(length: int) -> int:
    return hash_threads(length) if length >= SHARED_COPY_BYTES else 1


def kvhash64(data: object) -> int:
    """The KVH-64 digest of ``data``'s bytes (bytes, any C-contiguous buffer or numpy array)."""
    raw = _bytes_of(data)
    copier = _native.load()
    if copier is None:
        return kvhash64_reference(raw)
    if not raw.size:
        return copier.hash_copy(0, 0, 0, threads=1, stream=False)
    return copier.hash_copy(0, raw.ctypes.data, raw.size, threads=_threads(raw.size), stream=False)


def kvhash64_many(arrays: Sequence[object]) -> list[int]:
    """``kvhash64`` of each buffer, in one call shared by the copier's threads when large."""
    raws = [_bytes_of(a) for a in arrays]
    copier = _native.load()
    if copier is None:
        return [kvhash64_reference(r) for r in raws]
    srcs, lengths = _ranges(raws)
    return copier.hash_ranges(
        None, srcs, lengths, threads=hash_threads(int(lengths.sum()))
    ).tolist()


def copy_host_hashed(dst: np.ndarray, src: np.ndarray, *, stream: bool = False) -> int:
    """``copy_host(dst, src, stream=stream)`` that also returns ``kvhash64(src)``: one pass
    over the source where the native library runs (the digest is of the bytes copied)."""
    _check_host_pair(dst, src)
    copier = _native.load()
    if copier is None:
        copy_host(dst, src, stream=stream)
        return kvhash64_reference(dst)
    n = dst.nbytes
    if not n:
        return copier.hash_copy(0, 0, 0, threads=1, stream=False)
    return copier.hash_copy(dst.ctypes.data, src.ctypes.data, n, threads=_threads(n), stream=stream)


# A bytes object of n bytes not yet filled in (CPython's own way of building one): filled by
# the copier before anything else sees it, so a read returns bytes with one pass over the
# source instead of a copy (bytes()) and then a hash of that copy.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def bytes_hashed(src: np.ndarray) -> tuple[bytes, int]:
    """A new ``bytes`` holding ``src``'s bytes (a C-contiguous host array), and their
    ``kvhash64``, from one pass over ``src`` where the native library runs."""
    if not src.flags.c_contiguous:
        raise InvalidRequest("bytes_hashed needs a C-contiguous array")
    copier = _native.load()
    n = src.nbytes
    if copier is None or not n:
        data = src.tobytes()
        return data, kvhash64(data)
    data = _new_bytes(None, n)
    address = np.frombuffer(data, np.uint8).ctypes.data
    return data, copier.hash_copy(address, src.ctypes.data, n, threads=_threads(n), stream=False)


def copy_host_many_hashed(
    dsts: Sequence[np.ndarray], srcs: Sequence[np.ndarray], *, stream: bool = False
) -> list[int]:
    """``copy_host_many`` that also returns each source's ``kvhash64`` (a store's verified
    batch read: copy and check in one pass, by 64 KiB blocks over the copier's threads)."""
    if len(dsts) != len(srcs):
        raise InvalidRequest(f"{len(srcs)} sources for {len(dsts)} destinations")
    for dst, src in zip(dsts, srcs, strict=True):
        _check_host_pair(dst, src)
    copier = _native.load()
    if copier is None:
        copy_host_many(dsts, srcs, stream=stream)
        return [kvhash64_reference(d) for d in dsts]
    src_addresses, lengths = _ranges(srcs)
    dst_addresses = np.fromiter((d.ctypes.data for d in dsts), dtype=np.int64, count=len(dsts))
    return copier.hash_ranges(
        dst_addresses,
        src_addresses,
        lengths,
        threads=hash_threads(int(lengths.sum())),
        stream=stream,
    ).tolist()


def _ranges(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = len(arrays)
    return (
        np.fromiter((a.ctypes.data for a in arrays), dtype=np.int64, count=n),
        np.fromiter((a.nbytes for a in arrays), dtype=np.int64, count=n),
    )
