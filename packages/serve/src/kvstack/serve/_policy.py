"""Routing policies of the router: which worker gets a request.

A policy sees the candidate workers (healthy, breaker not open) with the router's own count of
requests in flight on each, and the request's routing key, and returns one of them. Policies are
pure and synchronous: the router calls them on its event loop, so they never block or await.

The routing key is a sequence of ints built by :func:`routing_key`: a text prompt becomes its
Unicode code points, a token-id prompt its ids shifted below zero (so the two never collide), and
chat messages their role and content joined the same way every time. The router does not
tokenize: workers may serve models with different tokenizers, and keeping the model out of the
router keeps it light. Matching characters approximates matching tokens well because the workers'
prefix cache matches tokens of the same text (SMG does the same for HTTP: a character tree).

``cache_aware`` follows SGLang's model gateway (``policies/cache_aware.rs``, see
shared/reference/serving.md): if the load spread is over both thresholds, the least-loaded worker;
otherwise the worker whose tree matches the longest prefix, when the match covers more than
``cache_threshold`` of the key; otherwise (a miss) the least-loaded worker, never the "smallest
tree", which fed SGLang's death spiral (PR #14305).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from kvstack.serve.errors import ConfigError

__all__ = [
    "CacheAwarePolicy",
    "PolicyName",
    "PowerOfTwoPolicy",
    "PrefixTree",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RoutingPolicy",
    "WorkerLoad",
    "make_policy",
    "routing_key",
]


class PolicyName(StrEnum):
    """The policies ``--policy`` accepts."""

    CACHE_AWARE = "cache_aware"
    POWER_OF_TWO = "power_of_two"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A candidate worker: its URL, requests in flight through this router, and its index."""

    url: str
    in_flight: int
    index: int


class RoutingPolicy(Protocol):
    """Picks a worker for a request; ``candidates`` is never empty."""

    @property
    def name(self) -> str: ...

    def select(self, candidates: Sequence[WorkerLoad], key: Sequence[int]) -> WorkerLoad: ...


def routing_key(body: Mapping[str, Any]) -> list[int]:
    """The routing key of a completion or chat request body (``[]`` when it has no prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [ord(c) for c in prompt]
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [-1 - t for t in prompt]  # token ids below zero: never equal to a code point
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return [ord(c) for c in prompt[0]]
        return []
    messages = body.get("messages")
    if isinstance(messages, list):
        key: list[int] = []
        for message in messages:
            if not isinstance(message, dict):
                return key
            content = message.get("content")
            if isinstance(content, list):  # content parts: their text, in order
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            # \x1e and \x1f (record and unit separators) keep "ab"+"c" apart from "a"+"bc".
            key.extend(ord(c) for c in f"{message.get('role', '')}\x1f{content or ''}\x1e")
        return key
    return []


def _least_loaded(candidates: Sequence[WorkerLoad], routed: Mapping[str, int]) -> WorkerLoad:
    # Ties break on how many requests this policy sent there, then on the index: an idle pool
    # then takes turns instead of piling onto worker 0 (SMG breaks ties on (load, processed, idx)).
    return min(candidates, key=lambda w: (w.in_flight, routed.get(w.url, 0), w.index))


@dataclass(slots=True)
class _Node:
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    # tenant (worker URL) -> tick of its last insert or match through this node
    tenants: dict[str, int] = field(default_factory=dict)
    parent: _Node | None = None
    edge: tuple[int, ...] = ()


class PrefixTree:
    """An approximate prefix tree of what each worker has seen, in blocks of ``block_len`` keys.

    Keys go in whole blocks, like the workers' KV pages (a partial last block is not stored).
    A tenant present at a node is present at all its ancestors, so a walk from the root finds the
    longest prefix of each tenant. Each tenant holds at most ``max_nodes_per_tenant`` nodes: an
    insert past that evicts the tenant's least recently used leaves down to 90% of the limit, so
    eviction runs once per 10% of growth rather than on every insert.
    """

    def __init__(self, *, block_len: int = 16, max_nodes_per_tenant: int = 65536) -> None:
        if block_len < 1:
            raise ConfigError("block_len", block_len, "must be a positive integer")
        if max_nodes_per_tenant < 1:
            raise ConfigError(
                "max_nodes_per_tenant", max_nodes_per_tenant, "must be a positive integer"
            )
        self.block_len = block_len
        self.max_nodes_per_tenant = max_nodes_per_tenant
        self._root = _Node()
        self._sizes: dict[str, int] = {}
        self._tick = itertools.count(1)

    def _blocks(self, key: Sequence[int]) -> list[tuple[int, ...]]:
        n = self.block_len
        return [tuple(key[i : i + n]) for i in range(0, len(key) - n + 1, n)]

    def size(self, tenant: str) -> int:
        """Nodes ``tenant`` holds."""
        return self._sizes.get(tenant, 0)

    def insert(self, key: Sequence[int], tenant: str) -> None:
        """Record that ``tenant`` has seen ``key`` (its whole blocks)."""
        tick = next(self._tick)
        node = self._root
        added = 0
        for block in self._blocks(key):
            child = node.children.get(block)
            if child is None:
                child = _Node(parent=node, edge=block)
                node.children[block] = child
            if tenant not in child.tenants:
                added += 1
            child.tenants[tenant] = tick
            node = child
        if added:
            self._sizes[tenant] = self._sizes.get(tenant, 0) + added
            if self._sizes[tenant] > self.max_nodes_per_tenant:
                self._evict(tenant, self.max_nodes_per_tenant * 9 // 10)

    def match(self, key: Sequence[int], tenants: Sequence[str]) -> tuple[int, list[str]]:
        """Longest prefix of ``key`` held by any of ``tenants``: (keys matched, who holds it)."""
        tick = next(self._tick)
        node = self._root
        alive = set(tenants)
        holders: list[str] = []
        matched = 0
        for block in self._blocks(key):
            child = node.children.get(block)
            if child is None:
                break
            here = [t for t in child.tenants if t in alive]
            if not here:
                break
            holders = here
            for t in here:
                child.tenants[t] = tick
            matched += len(block)
            node = child
        return matched, holders

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything ``tenant`` holds (a worker taken out of the pool)."""
        self._evict(tenant, 0)

    def _evict(self, tenant: str, target: int) -> None:
        # Leaves of the tenant (nodes whose children it does not hold), oldest first; removing a
        # leaf can make its parent a leaf, which then joins the heap.
        heap: list[tuple[int, int, _Node]] = []
        order = itertools.count()
        stack = [self._root]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if tenant in child.tenants:
                    stack.append(child)
                    if not any(tenant in c.tenants for c in child.children.values()):
                        heapq.heappush(heap, (child.tenants[tenant], next(order), child))
        size = self._sizes.get(tenant, 0)
        while size > target and heap:
            _, _, node = heapq.heappop(heap)
            del node.tenants[tenant]
            size -= 1
            parent = node.parent
            if not node.tenants and not node.children and parent is not None:
                del parent.children[node.edge]
            if (
                parent is not None
                and parent is not self._root
                and tenant in parent.tenants
                and not any(tenant in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], next(order), parent))
        if size:
            self._sizes[tenant] = size
        else:
            self._sizes.pop(tenant, None)


class CacheAwarePolicy:
    """Cache affinity unless the load is imbalanced; misses and imbalance go to the least loaded.

    Imbalanced means ``max - min > balance_abs_threshold`` and ``max > balance_rel_threshold *
    min`` over the candidates' requests in flight. A hit means the longest prefix held by a
    candidate covers more than ``cache_threshold`` of the key.
    """

    name = PolicyName.CACHE_AWARE.value

    def __init__(
        self,
        *,
        cache_threshold: float = 0.5,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.5,
        block_len: int = 16,
        max_nodes_per_tenant: int = 65536,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ConfigError("cache_threshold", cache_threshold, "must be in [0, 1]")
        if balance_abs_threshold < 0:
            raise ConfigError("balance_abs_threshold", balance_abs_threshold, "must be >= 0")
        if not balance_rel_threshold >= 1.0:
            raise ConfigError("balance_rel_threshold", balance_rel_threshold, "must be >= 1")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.tree = PrefixTree(block_len=block_len, max_nodes_per_tenant=max_nodes_per_tenant)
        self._routed: dict[str, int] = {}
        self.last_outcome = "miss"  # of the latest select(): "hit", "miss" or "imbalanced"

    def is_imbalanced(self, candidates: Sequence[WorkerLoad]) -> bool:
        """Whether the spread of requests in flight is past both thresholds."""
        loads = [w.in_flight for w in candidates]
        high, low = max(loads), min(loads)
        return high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low

    def select(self, candidates: Sequence[WorkerLoad], key: Sequence[int]) -> WorkerLoad:
        """The chosen worker; records the key in its tree."""
        if self.is_imbalanced(candidates):
            self.last_outcome = "imbalanced"
            chosen = _least_loaded(candidates, self._routed)
        else:
            matched, holders = self.tree.match(key, [w.url for w in candidates])
            if key and holders and matched / len(key) > self.cache_threshold:
                self.last_outcome = "hit"
                owners = [w for w in candidates if w.url in holders]
                chosen = _least_loaded(owners, self._routed)
            else:
                self.last_outcome = "miss"
                chosen = _least_loaded(candidates, self._routed)
        self._routed[chosen.url] = self._routed.get(chosen.url, 0) + 1
        self.tree.insert(key, chosen.url)
        return chosen


class PowerOfTwoPolicy:
    """The less loaded of two workers drawn at random."""

    name = PolicyName.POWER_OF_TWO.value

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - load spreading, not security

    def select(self, candidates: Sequence[WorkerLoad], key: Sequence[int]) -> WorkerLoad:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return min((a, b), key=lambda w: (w.in_flight, w.index))


class RoundRobinPolicy:
    """Each worker in turn, skipping those not among the candidates."""

    name = PolicyName.ROUND_ROBIN.value

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[WorkerLoad], key: Sequence[int]) -> WorkerLoad:
        # The first candidate at or after the cursor (by worker index), so an excluded worker
        # does not shift the turns of the others.
        ordered = sorted(candidates, key=lambda w: w.index)
        chosen = next((w for w in ordered if w.index >= self._next), ordered[0])
        self._next = chosen.index + 1
        return chosen


class RandomPolicy:
    """A worker drawn uniformly at random."""

    name = PolicyName.RANDOM.value

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - load spreading, not security

    def select(self, candidates: Sequence[WorkerLoad], key: Sequence[int]) -> WorkerLoad:
        return self._rng.choice(list(candidates))


def make_policy(
    name: str,
    *,
    cache_threshold: float = 0.5,
    balance_abs_threshold: int = 32,
    balance_rel_threshold: float = 1.5,
    block_len: int = 16,
    max_nodes_per_tenant: int = 65536,
    seed: int | None = None,
) -> RoutingPolicy:
    """The policy called ``name`` (one of :class:`PolicyName`); raises ConfigError."""
    try:
        which = PolicyName(name)
    except ValueError:
        choices = ", ".join(p.value for p in PolicyName)
        raise ConfigError("policy", name, f"must be one of {choices}") from None
    if which is PolicyName.CACHE_AWARE:
        return CacheAwarePolicy(
            cache_threshold=cache_threshold,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
            block_len=block_len,
            max_nodes_per_tenant=max_nodes_per_tenant,
        )
    if which is PolicyName.POWER_OF_TWO:
        return PowerOfTwoPolicy(seed=seed)
    if which is PolicyName.ROUND_ROBIN:
        return RoundRobinPolicy()
    return RandomPolicy(seed=seed)
