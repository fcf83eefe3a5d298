"""Continuous batching: which requests run this step, and how many tokens each.

Each step has a token budget. Running requests go first (a decode costs one token, an unfinished
prefill its next chunk), then waiting ones in arrival order, which start from their longest
cached prefix. When the pool runs out of blocks the most recently admitted running request is
preempted: its blocks are released (the full ones stay cached) and it waits again, to be
recomputed from its tokens so far.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from kvstack.serve._kv_cache import BlockPool, chain_hashes
from kvstack.serve._request import Request, RequestStatus
from kvstack.serve._store_cache import StorePrefixCache

__all__ = ["ScheduledBatch", "Scheduler"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """One step's work: ``(request, new tokens)`` in batch order, and who was preempted."""

    items: list[tuple[Request, int]]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        """Tokens the forward pass runs."""
        return sum(n for _, n in self.items)


class Scheduler:
    """Owns the waiting queue, the running list and every request's blocks."""

    def __init__(
        self,
        pool: BlockPool,
        *,
        block_size: int,
        root_hash: bytes,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        enable_prefix_caching: bool,
        store: StorePrefixCache | None = None,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.root_hash = root_hash
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_prefix_caching = enable_prefix_caching
        self.store = store if enable_prefix_caching else None
        self.store_hit_tokens = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- queue changes -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, *, hold: bool = False) -> None:
        """Remove a request (finished or aborted) and release its blocks, unless ``hold``."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        if not hold:
            self._release(request)

    def release_held(self, request: Request) -> None:
        """Release the blocks of a finished request that ``finish(hold=True)`` kept."""
        self._release(request)

    def reserve(self, request: Request) -> bool:
        """Hold fresh blocks for the whole prompt (a PD handoff writes them); False when short."""
        needed = -(-len(request.prompt_token_ids) // self.block_size)
        if needed > self.pool.num_free:
            return False
        request.block_ids = self.pool.allocate(needed)
        request.status = RequestStatus.TRANSFERRING
        return True

    def activate(self, request: Request) -> None:
        """A reserved request whose prompt KV has landed: it decodes from here."""
        request.num_computed_tokens = len(request.prompt_token_ids)
        self.commit(request, save=False)  # the prefill worker saved them to the store already
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _release(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_registered_blocks = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.info(
            "preempted request %s (%d tokens; %d free blocks)",
            request.request_id,
            request.num_tokens,
            self.pool.num_free,
        )

    # ---- prefix cache ----------------------------------------------------------------------

    def _update_hashes(self, request: Request) -> None:
        request.block_hashes = chain_hashes(
            self.root_hash, request.all_token_ids, self.block_size, known=request.block_hashes
        )

    def _cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the request's longest cached prefix (at least one token left to run)."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(request)
        # The last token must be computed to get logits, so a fully cached prompt gives back
        # its final block.
        limit = (request.num_tokens - 1) // self.block_size
        blocks = []
        for digest in request.block_hashes[:limit]:
            block = self.pool.lookup(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def commit(self, request: Request, *, save: bool = True) -> None:
        """Register the request's newly completed full blocks in the prefix cache (and, with
        ``save``, write them back to the store)."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        first = request.num_registered_blocks
        if full <= first:
            return
        self._update_hashes(request)
        for index in range(first, full):
            self.pool.register(request.block_ids[index], request.block_hashes[index])
        request.num_registered_blocks = full
        if save and self.store is not None:
            self.store.save(request.block_hashes[first:full], request.block_ids[first:full])

    def _load_from_store(self, request: Request, num_local: int, num_found: int) -> int:
        """Read the store's blocks after the local prefix into the request's new blocks."""
        assert self.store is not None
        end = num_local + num_found
        digests = request.block_hashes[num_local:end]
        blocks = request.block_ids[num_local:end]
        loaded = self.store.load(digests, blocks)
        for digest, block in zip(digests[:loaded], blocks[:loaded], strict=True):
            self.pool.register(block, digest)
        return loaded

    # ---- allocation ------------------------------------------------------------------------

    def _blocks_needed(self, request: Request, num_new: int, num_cached_blocks: int) -> int:
        total = -(-(request.num_computed_tokens + num_new) // self.block_size)
        return max(0, total - len(request.block_ids) - num_cached_blocks)

    def _try_allocate(self, request: Request, num_new: int, cached: list[int]) -> bool:
        # Cached blocks nobody holds sit in the free queue: touching them uses up free blocks too.
        cached_free = sum(1 for b in cached if self.pool.ref_counts[b] == 0)
        needed = self._blocks_needed(request, num_new, len(cached))
        if needed + cached_free > self.pool.num_free:
            return False
        self.pool.touch(cached)
        request.block_ids.extend(cached)
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    # ---- the step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work under the token budget, preempting when blocks run out."""
        budget = self.max_num_batched_tokens
        items: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            admitted = True
            while not self._try_allocate(request, num_new, []):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    admitted = False
                    break
            if not admitted:
                break
            items.append((request, num_new))
            budget -= num_new
            index += 1
        if preempted:
            return ScheduledBatch(items=items, preempted=preempted)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self._cached_prefix(request)
            # Blocks past the local prefix that another instance computed: read, not recomputed.
            in_store = 0
            if self.store is not None:
                limit = (request.num_tokens - 1) // self.block_size
                in_store = self.store.lookup(request.block_hashes[len(cached) : limit])
            first_schedule = request.num_preemptions == 0
            request.num_computed_tokens = (len(cached) + in_store) * self.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._try_allocate(request, num_new, cached):
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            loaded = self._load_from_store(request, len(cached), in_store) if in_store else 0
            # A block that vanished between lookup and read is computed instead: fewer tokens
            # this step, in blocks already allocated.
            request.num_computed_tokens = (len(cached) + loaded) * self.block_size
            request.num_registered_blocks = len(cached) + loaded
            if first_schedule:
                request.num_cached_tokens = request.num_computed_tokens
                request.num_store_cached_tokens = loaded * self.block_size
                self.pool.prefix_query_tokens += len(request.prompt_token_ids)
                self.pool.prefix_hit_tokens += len(cached) * self.block_size
                self.store_hit_tokens += loaded * self.block_size
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            items.append((request, num_new))
            budget -= num_new
        return ScheduledBatch(items=items, preempted=preempted)
