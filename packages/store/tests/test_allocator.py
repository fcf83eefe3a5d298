"""Property tests of the segment allocator: no overlap, all freed space reusable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvstack.store import SegmentAllocator
from kvstack.store._allocator import ALIGN, aligned

SEEDS = [0, 1, 2, 3]
CAPACITY = 1 << 22  # 4 MiB: small enough that random churn hits full and fragmented states


def _check_invariants(alloc: SegmentAllocator, live: dict[int, int]) -> None:
    spans = sorted((off, aligned(n)) for off, n in live.items())
    for (a, la), (b, _) in itertools.pairwise(spans):
        assert a + la <= b, f"allocations overlap: {a}+{la} > {b}"
    free = alloc.free_blocks()
    everything = sorted(spans + free)
    cursor = 0
    for off, length in everything:
        assert off == cursor, f"gap or overlap at {cursor} (next block at {off})"
        cursor = off + length
    assert cursor == alloc.capacity_bytes
    # Free neighbours are always merged.
    for (a, la), (b, _) in itertools.pairwise(free):
        assert a + la < b
    assert alloc.used_bytes == sum(aligned(n) for n in live.values())


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_random_churn_never_overlaps_and_frees_everything(seed: int) -> None:
    rng = np.random.default_rng(seed)
    alloc = SegmentAllocator(CAPACITY)
    live: dict[int, int] = {}
    for step in range(3000):
        if live and (rng.random() < 0.45 or step % 500 == 499):
            offset = int(rng.choice(list(live)))
            alloc.free(offset, live.pop(offset))
        else:
            # Sizes span 1 byte to 256 KiB, odd on purpose (alignment padding).
            size = int(rng.integers(1, 256 << 10))
            offset = alloc.allocate(size)
            if offset is None:
                assert alloc.stats().largest_free_bytes < aligned(size)
                continue
            assert offset % ALIGN == 0
            assert offset not in live
            live[offset] = size
        if step % 100 == 0:
            _check_invariants(alloc, live)
    _check_invariants(alloc, live)
    for offset, size in list(live.items()):
        alloc.free(offset, size)
    assert alloc.free_blocks() == [(0, CAPACITY)]
    assert alloc.allocate(CAPACITY) == 0  # all freed space is one reusable block


def test_fills_exactly_then_reports_full() -> None:
    alloc = SegmentAllocator(64 * ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in range(64)]
    assert sorted(o for o in offsets if o is not None) == [i * ALIGN for i in range(64)]
    assert alloc.allocate(1) is None
    stats = alloc.stats()
    assert (stats.utilisation, stats.free_bytes, stats.fragmentation) == (1.0, 0, 0.0)


def test_fragmentation_is_reported() -> None:
    alloc = SegmentAllocator(8 * ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in range(8)]
    for o in offsets[::2]:
        assert o is not None
        alloc.free(o, ALIGN)
    stats = alloc.stats()
    assert stats.free_bytes == 4 * ALIGN
    assert stats.largest_free_bytes == ALIGN
    assert stats.fragmentation == pytest.approx(0.75)
    assert alloc.allocate(2 * ALIGN) is None  # free, but not contiguous


def test_rebuild_restores_used_ranges() -> None:
    alloc = SegmentAllocator(1 << 20)
    alloc.rebuild([(4096, 100), (0, 64)])
    assert alloc.used_bytes == 64 + 128
    assert alloc.free_blocks() == [(64, 4096 - 64), (4096 + 128, (1 << 20) - 4096 - 128)]
    with pytest.raises(ValueError, match="overlaps"):
        alloc.rebuild([(0, 128), (64, 64)])


def test_double_free_and_out_of_range_free_refused() -> None:
    alloc = SegmentAllocator(1 << 16)
    offset = alloc.allocate(100)
    assert offset is not None
    alloc.free(offset, 100)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(offset, 100)
    with pytest.raises(ValueError, match="outside the segment"):
        alloc.free(1 << 16, 64)
