"""Host copies of many ranges (the shm page path): every layout verified byte for byte, through
the native library and the pure-Python fallback."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

from kvstack.transfer import InvalidRequest, _memory
from kvstack.transfer._memory import coalesce, memcpy_many, memcpy_ranges

KiB = 1 << 10
REGION_BYTES = 8 << 20
# Layouts of a batch: (seed, pages, page bytes, fraction of pages that continue the previous
# one on both sides, unaligned). 4099-byte pages are odd on purpose; 2 MiB ranges are cut into
# pieces before being shared with the copy threads.
LAYOUTS = [
    (0, 64, 16 * KiB, 0.0, False),  # scattered KV pages: nothing merges
    (1, 64, 16 * KiB, 1.0, False),  # one contiguous run: one memmove
    (2, 200, 4099, 0.5, True),  # runs of adjacent pages, odd sizes, odd offsets
    (3, 3, 2 << 20, 0.3, True),  # few big ranges
    (4, 1, 5, 0.0, True),
]
LAYOUT_IDS = ["scattered", "contiguous", "mixed-unaligned", "big", "one"]


def _layout(
    seed: int, pages: int, page: int, adjacent: float, unaligned: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dst offsets, src offsets, lengths): destinations never overlap, sources may."""
    rng = np.random.default_rng(seed)
    slot = page + (7 if unaligned else 0)
    dst_slots = rng.permutation(REGION_BYTES // slot)[:pages]
    dsts: list[int] = []
    srcs: list[int] = []
    lengths: list[int] = []

    def clear(dst: int, length: int) -> bool:
        return all(d + n <= dst or dst + length <= d for d, n in zip(dsts, lengths, strict=True))

    for i in range(pages):
        length = page - int(rng.integers(0, 3)) if unaligned else page
        if dsts and rng.random() < adjacent:
            dst, src = dsts[-1] + lengths[-1], srcs[-1] + lengths[-1]
            # Continuing the run must stay in bounds and clear of every other destination.
            in_bounds = dst + length <= REGION_BYTES and src + length <= REGION_BYTES
            if in_bounds and clear(dst, length):
                dsts.append(dst)
                srcs.append(src)
                lengths.append(length)
                continue
        dst = int(dst_slots[i]) * slot + (int(rng.integers(0, 7)) if unaligned else 0)
        if not clear(dst, length):
            continue
        dsts.append(dst)
        srcs.append(int(rng.integers(0, REGION_BYTES - length + 1)))
        lengths.append(length)
    return (
        np.array(dsts, dtype=np.int64),
        np.array(srcs, dtype=np.int64),
        np.array(lengths, dtype=np.int64),
    )


@pytest.fixture(params=["serial", "threads"])
def copy_threads(
    request: pytest.FixtureRequest, copy_path: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Run a test with page copies on the caller only, or shared out in tiny chunks, through
    the native library or the pure-Python fallback (``copy_path``)."""
    if request.param == "threads":
        # Even a 2-core box must exercise the shared paths: every chunk a few pages.
        monkeypatch.setattr(_memory, "_NATIVE_THREADS", 3)
        monkeypatch.setattr(_memory, "_BYTES_PER_THREAD", 20 * KiB)
        monkeypatch.setattr(_memory, "_RANGES_THREADS", 2)
        monkeypatch.setattr(_memory, "_COPY_THREADS", max(2, _memory._COPY_THREADS))
        monkeypatch.setattr(_memory, "PARALLEL_RANGES_BYTES", 1)
        monkeypatch.setattr(_memory, "_RANGES_MIN_AVERAGE_BYTES", 0)
        monkeypatch.setattr(_memory, "_RANGES_CHUNK_BYTES", 20 * KiB)
    else:
        monkeypatch.setattr(_memory, "_NATIVE_THREADS", 1)
        monkeypatch.setattr(_memory, "_RANGES_THREADS", 1)
    return f"{copy_path}-{request.param}"


@pytest.mark.parametrize(
    ("seed", "pages", "page", "adjacent", "unaligned"), LAYOUTS, ids=LAYOUT_IDS
)
def test_memcpy_ranges_byte_for_byte(
    copy_threads: str, seed: int, *, pages: int, page: int, adjacent: float, unaligned: bool
) -> None:
    dst_offsets, src_offsets, lengths = _layout(seed, pages, page, adjacent, unaligned)
    rng = np.random.default_rng(seed + 100)
    src = rng.integers(0, 256, REGION_BYTES, dtype=np.uint8)
    dst = rng.integers(0, 256, REGION_BYTES, dtype=np.uint8)
    expected = dst.copy()
    for d, s, n in zip(dst_offsets.tolist(), src_offsets.tolist(), lengths.tolist(), strict=True):
        expected[d : d + n] = src[s : s + n]
    memcpy_ranges(dst_offsets + dst.ctypes.data, src_offsets + src.ctypes.data, lengths)
    np.testing.assert_array_equal(dst, expected)


def test_memcpy_many_lists_byte_for_byte(copy_threads: str) -> None:
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    dsts = [np.zeros(n, dtype=np.uint8) for n in (0, 1, 4097, 1 << 20, (1 << 20) + 3)]
    starts = [0, 5, 9, 1 << 20, 123]
    memcpy_many(
        [d.ctypes.data for d in dsts],
        [src.ctypes.data + s for s in starts],
        [d.nbytes for d in dsts],
    )
    for d, s in zip(dsts, starts, strict=True):
        np.testing.assert_array_equal(d, src[s : s + d.nbytes])


def test_coalesce_merges_only_runs_adjacent_on_both_sides() -> None:
    # 0: start; 1: continues 0 on both sides; 2: continues 1 locally only; 3: remotely only;
    # 4: continues 3 on both sides; 5: empty, continues 4; 6: continues 5 (so 4).
    dsts = np.array([0, 10, 20, 100, 110, 115, 115], dtype=np.int64)
    srcs = np.array([50, 60, 0, 10, 20, 25, 25], dtype=np.int64)
    lengths = np.array([10, 10, 10, 10, 5, 0, 3], dtype=np.int64)
    merged = coalesce(dsts, srcs, lengths)
    assert [a.tolist() for a in merged] == [[0, 20, 100], [50, 0, 10], [20, 10, 18]]


@pytest.mark.parametrize(
    "length", [1, (1 << 20) + 3, (9 << 20) + 1], ids=["1B", "1MiB+3", "9MiB+1"]
)
def test_memcpy_byte_for_byte(copy_threads: str, length: int) -> None:
    # Big single copies are shared out too (native: by bytes; fallback: 2 MiB chunks from 8 MiB).
    rng = np.random.default_rng(length)
    src = rng.integers(0, 256, length + 10, dtype=np.uint8)
    dst = rng.integers(0, 256, length + 10, dtype=np.uint8)
    expected = dst.copy()
    expected[7 : 7 + length] = src[3 : 3 + length]
    _memory.memcpy(dst.ctypes.data + 7, src.ctypes.data + 3, length)
    np.testing.assert_array_equal(dst, expected)


def _allocated_bytes(region: _memory.ShmRegion) -> int:
    return os.stat(os.path.join(_memory.SHM_DIR, region.name)).st_blocks * 512


def _resident_bytes(address: int) -> int:
    """Rss of the mapping of this process that starts at ``address`` (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == address
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping starts at {address:#x}")


@pytest.mark.skipif(sys.platform != "linux", reason="shm and /proc are Linux's")
def test_prefaulted_segment_is_allocated_and_peers_map_every_page() -> None:
    size = 8 << 20
    sparse = _memory.ShmRegion.create(size)
    owner = _memory.ShmRegion.create(size, prefault=True)
    try:
        assert _allocated_bytes(sparse) == 0  # sparse: pages appear when touched
        assert _allocated_bytes(owner) == size
        assert _resident_bytes(owner.address) == size
        # A peer of the prefaulted file maps every page in the background; a peer of the
        # sparse one maps none (populating it would allocate its holes).
        peer = _memory.ShmRegion.open(owner.name, size, writable=True)
        sparse_peer = _memory.ShmRegion.open(sparse.name, size, writable=True)
        deadline = time.monotonic() + 30
        while _resident_bytes(peer.address) < size and time.monotonic() < deadline:
            time.sleep(0.01)  # the populate thread's progress, bounded
        assert _resident_bytes(peer.address) == size
        assert _resident_bytes(sparse_peer.address) == 0
        assert _allocated_bytes(sparse) == 0
        # The pages are the owner's: bytes written by the peer are there.
        peer.array[12345:12349] = [1, 2, 3, 4]
        assert owner.array[12345:12349].tolist() == [1, 2, 3, 4]
    finally:
        sparse.unlink()
        owner.unlink()


@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streaming"])
@pytest.mark.parametrize(
    "length", [0, 1, 63, (64 << 10) - 1, (64 << 10) + 17, (1 << 20) + 5, (5 << 20) + 3]
)
def test_copy_host_byte_for_byte(stream: bool, length: int) -> None:
    rng = np.random.default_rng()
    src_buffer = rng.integers(0, 256, length + 64, dtype=np.uint8)
    dst_buffer = np.zeros(length + 64, dtype=np.uint8)
    # Unaligned on both sides: streaming stores align the destination themselves.
    s, d = int(rng.integers(1, 16)), int(rng.integers(1, 16))
    _memory.copy_host(dst_buffer[d : d + length], src_buffer[s : s + length], stream=stream)
    assert np.array_equal(dst_buffer[d : d + length], src_buffer[s : s + length])
    assert not dst_buffer[:d].any()  # nothing before it
    assert not dst_buffer[d + length :].any()  # nothing past it


def test_copy_host_refuses_mismatched_arrays() -> None:
    with pytest.raises(InvalidRequest, match="copy of 8 bytes into 4"):
        _memory.copy_host(np.zeros(4, dtype=np.uint8), np.zeros(8, dtype=np.uint8))
    with pytest.raises(InvalidRequest, match="writable destination"):
        _memory.copy_host(np.zeros(8, dtype=np.uint8)[::2], np.zeros(4, dtype=np.uint8))


def test_prefault_that_cannot_commit_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full /dev/shm (madvise fails with ENOMEM) refuses the segment, naming sizes, and
    leaves no file behind; a kernel without MADV_POPULATE_* (EINVAL) just maps lazily."""

    def madvise_failing_with(code: int) -> Callable[[int, int, int], int]:
        def madvise(_address: int, _length: int, _advice: int) -> int:
            ctypes.set_errno(code)
            return -1

        return madvise

    before = set(os.listdir(_memory.SHM_DIR))
    monkeypatch.setattr(_memory, "_madvise", madvise_failing_with(errno.ENOMEM))
    with pytest.raises(InvalidRequest, match=r"cannot commit 1048576 bytes of shared memory"):
        _memory.ShmRegion.create(1 << 20, prefault=True)
    assert set(os.listdir(_memory.SHM_DIR)) == before
    monkeypatch.setattr(_memory, "_madvise", madvise_failing_with(errno.EINVAL))
    region = _memory.ShmRegion.create(1 << 20, prefault=True)
    region.unlink()


def test_prefault_larger_than_the_host_is_refused_before_allocating() -> None:
    before = set(os.listdir(_memory.SHM_DIR))
    too_big = 2 * shutil.disk_usage(_memory.SHM_DIR).total
    with pytest.raises(InvalidRequest, match=rf"cannot commit {too_big} bytes of shared memory"):
        _memory.ShmRegion.create(too_big, prefault=True)
    assert set(os.listdir(_memory.SHM_DIR)) == before
