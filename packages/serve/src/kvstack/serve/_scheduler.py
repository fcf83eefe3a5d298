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
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.root_hash = root_hash
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- queue changes -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request."""
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Remove a request (finished or aborted) and release its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        self._release(request)

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

    def commit(self, request: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        if full <= request.num_registered_blocks:
            return
        self._update_hashes(request)
        for index in range(request.num_registered_blocks, full):
            self.pool.register(request.block_ids[index], request.block_hashes[index])
        request.num_registered_blocks = full

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
            first_schedule = request.num_preemptions == 0
            request.num_computed_tokens = len(cached) * self.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._try_allocate(request, num_new, cached):
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            request.num_registered_blocks = len(cached)
            if first_schedule:
                request.num_cached_tokens = request.num_computed_tokens
                self.pool.prefix_query_tokens += len(request.prompt_token_ids)
                self.pool.prefix_hit_tokens += request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            items.append((request, num_new))
            budget -= num_new
        return ScheduledBatch(items=items, preempted=preempted)
