"""Block pool and content hashes: chaining, the pinned layout, reuse, eviction order, refcounts."""

import hashlib
import struct

import pytest

from kvstack.serve import BlockPool, EngineError, block_hash, chain_hashes, root_hash


def test_hash_chain_is_deterministic_and_fingerprinted() -> None:
    root = root_hash("model-a")
    assert root == root_hash("model-a")
    assert root != root_hash("model-b")
    tokens = list(range(40))
    hashes = chain_hashes(root, tokens, 16)
    assert len(hashes) == 2  # the 8-token tail is not a full block
    assert hashes[0] == block_hash(root, tokens[:16])
    assert hashes[1] == block_hash(hashes[0], tokens[16:32])
    # The same block content after another prefix hashes differently: the chain carries it.
    assert block_hash(root, tokens[16:32]) != hashes[1]
    assert chain_hashes(root, tokens, 16, known=hashes[:1]) == hashes


# Pinned so a change of the hash layout (which would break prefix reuse across processes and
# instances) is a deliberate, visible change.
GOLDEN_BLOCK_HASH = "29d4a368c33a1f117253cb8a5d282f40d798125a29e58b489df46a2073aaf626"


def test_hash_golden_vector() -> None:
    root = hashlib.sha256(b"kvstack-kv-block/1|fp").digest()
    assert root_hash("fp") == root
    tokens = struct.pack("<4i", 1, 2, 3, 4)
    expected = hashlib.sha256(root + tokens).hexdigest()
    assert block_hash(root, [1, 2, 3, 4]).hex() == expected == GOLDEN_BLOCK_HASH


def test_pool_reuses_cached_blocks_and_evicts_oldest_first() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    pool.release(a)
    assert pool.num_free == 4
    assert pool.lookup(b"h0") == a[0]
    # Uncached blocks are handed out before cached ones.
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(a)
    assert pool.stats().num_cached_blocks == 2
    # Then cached ones, the least recently freed first (release frees a sequence tail first).
    evicted = pool.allocate(1)
    assert evicted == [a[1]]
    assert pool.lookup(b"h1") is None
    assert pool.lookup(b"h0") == a[0]
    pool.touch([a[0]])
    assert pool.ref_counts[a[0]] == 1
    pool.release([a[0], *fresh, *evicted])
    assert pool.num_free == 4
    assert all(count == 0 for count in pool.ref_counts)


def test_pool_refuses_double_release_and_overdraw() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(EngineError, match="released with reference count 0"):
        pool.release(blocks)
    with pytest.raises(EngineError, match="only 2 free"):
        pool.allocate(3)


def test_duplicate_content_keeps_the_first_block() -> None:
    pool = BlockPool(3)
    first, second = pool.allocate(2)
    pool.register(first, b"same")
    pool.register(second, b"same")
    assert pool.lookup(b"same") == first
    assert pool.hashes[second] is None
