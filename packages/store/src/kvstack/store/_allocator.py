"""Allocator over one contributed segment: segregated free lists with coalescing (TLSF-like).

Free blocks sit in bins by size class (bin ``b`` holds lengths in [2**(b-1), 2**b)); a bitmap
of non-empty bins finds a fitting class in O(1). A request first tries a few blocks of its own
class (a good fit keeps large blocks whole), then takes any block of the next non-empty larger
class and splits it. Freed blocks merge with free neighbours at once, so freeing everything
always leaves one block: no space is ever lost to fragmentation that freeing cannot undo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ALIGN", "AllocatorStats", "SegmentAllocator", "aligned"]

# Cache-line alignment: one object never shares a line with another (no false sharing between
# writers), and 64 B is < 2% of a 4 KiB KV page.
ALIGN = 64
# How many same-class blocks to try before splitting a larger one (bounded scan = O(1)).
_FIT_PROBES = 8


def aligned(length: int) -> int:
    """The bytes an object of ``length`` occupies (at least ALIGN)."""
    return max(ALIGN, (length + ALIGN - 1) // ALIGN * ALIGN)


@dataclass(frozen=True, slots=True)
class AllocatorStats:
    """Sizes in bytes; fragmentation = 1 - largest free block / free bytes (0 when none free)."""

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    largest_free_bytes: int
    free_blocks: int
    allocations: int

    @property
    def utilisation(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0

    @property
    def fragmentation(self) -> float:
        return 1.0 - self.largest_free_bytes / self.free_bytes if self.free_bytes else 0.0


class SegmentAllocator:
    """Offsets into a segment of ``capacity_bytes``. Not thread-safe (the master's loop owns it)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes // ALIGN * ALIGN
        self.used_bytes = 0
        self.allocations = 0
        self._by_start: dict[int, int] = {}  # free block start -> length
        self._by_end: dict[int, int] = {}  # free block end -> start
        self._bins: list[dict[int, None]] = [{} for _ in range(65)]  # ordered sets of starts
        self._nonempty = 0  # bit b set <=> bins[b] non-empty
        if self.capacity_bytes:
            self._insert(0, self.capacity_bytes)

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        b = length.bit_length()
        self._bins[b][start] = None
        self._nonempty |= 1 << b

    def _remove(self, start: int, length: int) -> None:
        del self._by_start[start]
        del self._by_end[start + length]
        b = length.bit_length()
        bin_ = self._bins[b]
        del bin_[start]
        if not bin_:
            self._nonempty &= ~(1 << b)

    def allocate(self, length: int) -> int | None:
        """Offset of ``aligned(length)`` free bytes, or None if no block is large enough."""
        need = aligned(length)
        b = need.bit_length()
        start = -1
        if self._nonempty >> b & 1:
            for probes, candidate in enumerate(self._bins[b]):
                if self._by_start[candidate] >= need:
                    start = candidate
                    break
                if probes >= _FIT_PROBES:
                    break
        if start < 0:
            higher = self._nonempty >> (b + 1)
            if higher:
                b2 = (higher & -higher).bit_length() + b
                start = next(iter(self._bins[b2]))
            else:
                # Last resort before "full": every block of the request's own class.
                bin_ = self._bins[b]
                start = next((s for s in bin_ if self._by_start[s] >= need), -1)
                if start < 0:
                    return None
        block = self._by_start[start]
        self._remove(start, block)
        if block > need:
            self._insert(start + need, block - need)
        self.used_bytes += need
        self.allocations += 1
        return start

    def free(self, offset: int, length: int) -> None:
        """Return ``aligned(length)`` bytes at ``offset``; merges with free neighbours."""
        size = aligned(length)
        if offset < 0 or offset + size > self.capacity_bytes or offset % ALIGN:
            raise ValueError(
                f"free of {size} bytes at offset {offset} is outside the segment "
                f"({self.capacity_bytes} bytes) or misaligned"
            )
        if offset in self._by_start or (offset + size) in self._by_end:
            raise ValueError(f"double free of {size} bytes at offset {offset}")
        self.used_bytes -= size
        self.allocations -= 1
        start, end = offset, offset + size
        after = self._by_start.get(end)
        if after is not None:
            self._remove(end, after)
            end += after
        before = self._by_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            start = before
        self._insert(start, end - start)

    def rebuild(self, used: Iterable[tuple[int, int]]) -> None:
        """Reset to exactly ``used`` (offset, length) in use; raises ValueError on overlap."""
        ranges = sorted((offset, aligned(length)) for offset, length in used)
        self._by_start.clear()
        self._by_end.clear()
        for bin_ in self._bins:
            bin_.clear()
        self._nonempty = 0
        self.used_bytes = 0
        self.allocations = 0
        cursor = 0
        for offset, size in ranges:
            if offset < cursor or offset + size > self.capacity_bytes:
                raise ValueError(f"range at offset {offset} ({size} bytes) overlaps or overflows")
            if offset > cursor:
                self._insert(cursor, offset - cursor)
            cursor = offset + size
            self.used_bytes += size
            self.allocations += 1
        if cursor < self.capacity_bytes:
            self._insert(cursor, self.capacity_bytes - cursor)

    def free_blocks(self) -> list[tuple[int, int]]:
        """(offset, length) of every free block, sorted."""
        return sorted(self._by_start.items())

    def stats(self) -> AllocatorStats:
        largest = 0
        if self._nonempty:
            top = self._bins[self._nonempty.bit_length() - 1]
            largest = max(self._by_start[s] for s in top)
        return AllocatorStats(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            free_bytes=self.capacity_bytes - self.used_bytes,
            largest_free_bytes=largest,
            free_blocks=len(self._by_start),
            allocations=self.allocations,
        )
