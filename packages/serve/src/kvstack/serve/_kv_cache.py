"""The paged KV cache's bookkeeping: block pool, content hashes, prefix reuse, eviction.

A block holds ``block_size`` tokens of K and V for every layer. A *full* block whose KV has been
computed gets a content hash, sha256 chained over the token ids from the sequence's start plus a
model/dtype/layout fingerprint, so two requests sharing a prefix share its blocks, and the same
prefix hashes the same in every process (never Python's ``hash``: LMCache #1403, vLLM #42625).

Blocks are reference counted. A block whose count drops to zero goes to the free queue but keeps
its KV and hash until it is handed out again: that is the prefix cache, evicted least recently
freed first. Blocks without a hash are handed out before any cached one.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvstack.serve.errors import EngineError

__all__ = ["BlockPool", "KVCacheStats", "block_hash", "chain_hashes", "root_hash"]

logger = logging.getLogger(__name__)

HASH_VERSION = b"kvstack-kv-block/1"


def root_hash(fingerprint: str) -> bytes:
    """The chain's seed: the model/dtype/layout fingerprint, so other models never match."""
    return hashlib.sha256(HASH_VERSION + b"|" + fingerprint.encode()).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256(parent || token ids as little-endian int32): one block's chained hash."""
    digest = hashlib.sha256(parent)
    digest.update(np.asarray(token_ids, dtype="<i4").tobytes())
    return digest.digest()


def chain_hashes(
    root: bytes, token_ids: Sequence[int], block_size: int, *, known: Sequence[bytes] = ()
) -> list[bytes]:
    """Hashes of every full block of ``token_ids``, reusing the ``known`` leading ones."""
    hashes = list(known)
    parent = hashes[-1] if hashes else root
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """A snapshot of the pool; ``prefix_*_tokens`` are counters since start."""

    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks


class BlockPool:
    """Block ids ``0 .. num_blocks - 1`` with reference counts and the hash → block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise EngineError(f"BlockPool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        # Free blocks in hand-out order: unhashed ones first, then cached ones, oldest first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks with no reference (including cached ones that may be evicted)."""
        return len(self._free)

    def lookup(self, digest: bytes) -> int | None:
        """The block holding the KV of ``digest``, or None."""
        return self._cached.get(digest)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks (referenced once), evicting cached ones when needed."""
        if count > len(self._free):
            raise EngineError(f"allocate({count}) with only {len(self._free)} free blocks")
        blocks = []
        evicted = 0
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            digest = self.hashes[block]
            if digest is not None:
                del self._cached[digest]
                self.hashes[block] = None
                evicted += 1
            self.ref_counts[block] = 1
            blocks.append(block)
        if evicted:
            logger.debug("evicted %d cached blocks (%d free left)", evicted, len(self._free))
        return blocks

    def touch(self, blocks: Sequence[int]) -> None:
        """Reference cached blocks that a new request reuses."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference each; a block reaching zero keeps its hash until reused."""
        # Reverse order: a sequence's tail is the least likely to be shared, so it goes first.
        for block in reversed(blocks):
            count = self.ref_counts[block]
            if count <= 0:
                raise EngineError(f"block {block} released with reference count {count}")
            self.ref_counts[block] = count - 1
            if count == 1:
                self._free[block] = None
                if self.hashes[block] is None:
                    self._free.move_to_end(block, last=False)

    def register(self, block: int, digest: bytes) -> None:
        """Record that ``block`` holds the full, computed block ``digest``."""
        if self.hashes[block] is not None or digest in self._cached:
            return  # already cached, or another block holds the same content
        self.hashes[block] = digest
        self._cached[digest] = block

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no request holds; returns how many."""
        dropped = 0
        for block in list(self._free):
            digest = self.hashes[block]
            if digest is not None:
                del self._cached[digest]
                self.hashes[block] = None
                self._free.move_to_end(block, last=False)
                dropped += 1
        logger.info("prefix cache reset: %d blocks dropped", dropped)
        return dropped

    def stats(self) -> KVCacheStats:
        """Counts for metrics and tests."""
        return KVCacheStats(
            num_blocks=self.num_blocks,
            num_free_blocks=len(self._free),
            num_cached_blocks=len(self._cached),
            prefix_query_tokens=self.prefix_query_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )
