"""Global prefix reuse: full KV blocks shared by every instance through ``kvstack.store``.

A block's store key is its chained content hash (``_kv_cache.block_hash``), which already mixes
in the model, dtype and block layout, so only an identical prefix under an identical layout
matches. Before prefilling, the scheduler asks how many of a request's next full blocks the
store holds (``lookup``) and reads them straight into the request's new KV blocks (``load``,
one ``get_into_batch``); the blocks it computes itself are copied out at once and written back
on a background thread (``save``), so the engine's step never waits for a put.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstack.serve._attention import PagedKVCache
from kvstack.store import AlreadyExists, StoreClient, StoreError

__all__ = ["StoreCacheStats", "StorePrefixCache", "store_key"]

logger = logging.getLogger(__name__)

KEY_PREFIX = "kvstack-kv/"
# Hashes known to be in the store (saved or loaded here): not written again. Bounded, LRU.
_KNOWN_LIMIT = 1 << 16


def store_key(digest: bytes) -> str:
    """The store key of one block's KV."""
    return KEY_PREFIX + digest.hex()


@dataclass(frozen=True, slots=True)
class StoreCacheStats:
    """Counters since start, for metrics."""

    lookups: int
    hit_blocks: int
    loaded_blocks: int
    bytes_read: int
    saved_blocks: int
    bytes_written: int
    dropped_saves: int
    errors: int


class StorePrefixCache:
    """Reads and writes whole KV blocks of one engine's cache in the store (thread-safe)."""

    def __init__(
        self,
        client: StoreClient,
        cache: PagedKVCache,
        *,
        max_pending_bytes: int = 256 << 20,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.cache = cache
        self.max_pending_bytes = max_pending_bytes
        self._owns_client = owns_client
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Condition()
        self._queue: deque[tuple[list[bytes], torch.Tensor]] = deque()
        self._pending_bytes = 0
        self._closed = False
        self._counts = {
            "lookups": 0,
            "hit_blocks": 0,
            "loaded_blocks": 0,
            "bytes_read": 0,
            "saved_blocks": 0,
            "bytes_written": 0,
            "dropped_saves": 0,
            "errors": 0,
        }
        self._writer = threading.Thread(
            target=self._write_loop, name="kvstack-serve-store-writer", daemon=True
        )
        self._writer.start()

    def _count(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counts[name] += value

    def _remember(self, digests: Sequence[bytes]) -> None:
        with self._lock:
            for digest in digests:
                self._known[digest] = None
                self._known.move_to_end(digest)
            while len(self._known) > _KNOWN_LIMIT:
                self._known.popitem(last=False)

    def stats(self) -> StoreCacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return StoreCacheStats(**self._counts)

    # ---- reads (engine thread) -----------------------------------------------------------

    def lookup(self, digests: Sequence[bytes]) -> int:
        """How many of ``digests``, from the first, the store holds; 0 if it cannot answer."""
        if not digests:
            return 0
        self._count("lookups")
        try:
            found = self.client.exists_batch([store_key(d) for d in digests])
        except StoreError as exc:
            self._count("errors")
            logger.warning("store lookup of %d blocks failed: %s", len(digests), exc)
            return 0
        hits = 0
        for outcome in found:
            if not (outcome.ok and outcome.value):
                break
            hits += 1
        self._count("hit_blocks", hits)
        return hits

    def load(self, digests: Sequence[bytes], blocks: Sequence[int]) -> int:
        """Read ``digests[i]`` into cache block ``blocks[i]``; how many leading ones landed."""
        if not digests:
            return 0
        cache = self.cache
        on_host = cache.blocks.device.type == "cpu"
        staging = (
            [cache.blocks[b] for b in blocks]
            if on_host
            else [torch.empty(cache.block_nbytes, dtype=torch.uint8) for _ in blocks]
        )
        try:
            result = self.client.get_into_batch([store_key(d) for d in digests], staging)
        except StoreError as exc:
            self._count("errors")
            logger.warning("store read of %d blocks failed: %s", len(digests), exc)
            return 0
        loaded = 0
        for outcome in result:
            if not outcome.ok or outcome.value != cache.block_nbytes:
                if outcome.ok:
                    logger.warning("store block %s has %s bytes", outcome.key, outcome.value)
                break
            loaded += 1
        if not on_host and loaded:
            for block, host in zip(blocks[:loaded], staging[:loaded], strict=True):
                cache.blocks[block].copy_(host)
        self._count("loaded_blocks", loaded)
        self._count("bytes_read", loaded * cache.block_nbytes)
        self._remember(digests[:loaded])
        return loaded

    # ---- writes (copied on the engine thread, put on the writer thread) ------------------

    def save(self, digests: Sequence[bytes], blocks: Sequence[int]) -> None:
        """Queue freshly computed blocks for the store (a copy: the blocks may be reused)."""
        with self._lock:
            fresh = [(d, b) for d, b in zip(digests, blocks, strict=True) if d not in self._known]
        if not fresh or self._closed:
            return
        nbytes = len(fresh) * self.cache.block_nbytes
        with self._lock:
            if self._pending_bytes + nbytes > self.max_pending_bytes:
                self._counts["dropped_saves"] += len(fresh)
                return
            self._pending_bytes += nbytes
        blocks_t = self.cache.blocks
        index = torch.tensor([b for _, b in fresh], dtype=torch.long, device=blocks_t.device)
        copy = blocks_t.index_select(0, index).cpu()
        self._remember([d for d, _ in fresh])
        with self._lock:
            self._queue.append(([d for d, _ in fresh], copy))
            self._lock.notify()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                digests, copy = self._queue.popleft()
            try:
                result = self.client.put_batch(
                    [(store_key(d), copy[i]) for i, d in enumerate(digests)]
                )
                written = sum(1 for o in result if o.ok)
                failed = [o for o in result if o.error and not isinstance(o.error, AlreadyExists)]
                if failed:
                    logger.warning(
                        "store write: %d of %d blocks failed, e.g. %s",
                        len(failed),
                        len(digests),
                        failed[0].error,
                    )
                self._count("saved_blocks", written)
                self._count("bytes_written", written * copy.shape[1])
                self._count("errors", len(failed))
            except StoreError as exc:
                self._count("errors")
                logger.warning("store write of %d blocks failed: %s", len(digests), exc)
            finally:
                with self._lock:
                    self._pending_bytes -= copy.numel()
                    self._lock.notify_all()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued save is written; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending_bytes == 0, timeout_s)

    def close(self) -> None:
        """Write what is queued, stop the writer, and close the client if this owns it."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._writer.join(timeout=30.0)
        if self._owns_client:
            self.client.close()
