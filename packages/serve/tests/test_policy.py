"""Routing policies as pure functions: the prefix tree, cache_aware's thresholds, the others."""

from __future__ import annotations

from collections import Counter

import pytest

from kvstack.serve import (
    CacheAwarePolicy,
    ConfigError,
    PolicyName,
    PowerOfTwoPolicy,
    PrefixTree,
    RandomPolicy,
    RoundRobinPolicy,
    RouterConfig,
    WorkerLoad,
    make_policy,
    routing_key,
)

A, B, C = "http://a", "http://b", "http://c"


def loads(*in_flight: int) -> list[WorkerLoad]:
    urls = (A, B, C)[: len(in_flight)]
    return [WorkerLoad(url, n, i) for i, (url, n) in enumerate(zip(urls, in_flight, strict=True))]


def key(text: str) -> list[int]:
    return routing_key({"prompt": text})


# ---- routing keys ------------------------------------------------------------------------


def test_routing_key_of_text_ids_and_chat() -> None:
    assert routing_key({"prompt": "ab"}) == [97, 98]
    assert routing_key({"prompt": ["ab"]}) == [97, 98]
    # token ids land below zero, so id 97 never matches the character "a"
    assert routing_key({"prompt": [97, 0]}) == [-98, -1]
    chat = routing_key({"messages": [{"role": "user", "content": "hi"}]})
    assert chat == [ord(c) for c in "user\x1fhi\x1e"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert routing_key({"messages": parts}) == chat
    # one message "ab" is not two messages "a" + "b"
    one = routing_key({"messages": [{"role": "user", "content": "ab"}]})
    two = routing_key(
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    )
    assert one != two[: len(one)]
    assert routing_key({}) == []
    assert routing_key({"prompt": 5}) == []


# ---- prefix tree ---------------------------------------------------------------------------


def test_tree_matches_whole_blocks_of_the_longest_prefix() -> None:
    tree = PrefixTree(block_len=4)
    tree.insert(key("abcdefghij"), A)  # blocks abcd, efgh; "ij" is a partial block, not stored
    tree.insert(key("abcdXXXX"), B)
    assert tree.match(key("abcdefghij"), [A, B]) == (8, [A])
    matched, holders = tree.match(key("abcdZZZZ"), [A, B])
    assert matched == 4
    assert sorted(holders) == [A, B]
    assert tree.match(key("zzzz"), [A, B]) == (0, [])
    assert tree.match(key("abc"), [A, B]) == (0, [])  # shorter than a block
    # only candidates count: B's longer match is invisible when B is out of the pool
    assert tree.match(key("abcdXXXX"), [A]) == (4, [A])
    assert tree.size(A) == 2
    assert tree.size(B) == 2


def test_tree_evicts_least_recently_used_leaves_per_tenant() -> None:
    tree = PrefixTree(block_len=2, max_nodes_per_tenant=10)
    tree.insert(key("aabbccdd"), A)  # 4 nodes
    tree.insert(key("eeffgghh"), A)  # 8 nodes
    tree.match(key("aabbccdd"), [A])  # the first path is now the more recent one
    tree.insert(key("iijjkk"), A)  # 11 nodes > 10: evict down to 9, oldest leaves first
    assert tree.size(A) == 9
    assert tree.match(key("aabbccdd"), [A]) == (8, [A])
    assert tree.match(key("iijjkk"), [A]) == (6, [A])
    assert tree.match(key("eeffgghh"), [A]) == (4, [A])  # lost its two deepest blocks
    tree.insert(key("xxyyzz"), B)
    tree.remove_tenant(A)
    assert tree.size(A) == 0
    assert tree.match(key("aabbccdd"), [A, B]) == (0, [])
    assert tree.match(key("xxyyzz"), [A, B]) == (6, [B])


def test_tree_stays_bounded_under_many_distinct_prompts() -> None:
    tree = PrefixTree(block_len=4, max_nodes_per_tenant=100)
    for i in range(500):
        tree.insert(key(f"{i:08d}prompt-{i}-tail"), A)
        assert tree.size(A) <= 100
    assert tree.match(key("00000499prompt-499-tail"), [A])[0] > 0  # the newest survives


# ---- cache_aware ---------------------------------------------------------------------------


def test_cache_aware_follows_affinity_above_the_threshold() -> None:
    policy = CacheAwarePolicy(cache_threshold=0.5, block_len=4)
    shared = "system prompt shared by the group. "
    first = policy.select(loads(0, 0), key(shared + "q1"))
    assert policy.last_outcome == "miss"
    for suffix in ("q2", "q3", "q4"):
        assert policy.select(loads(0, 0), key(shared + suffix)) == first
        assert policy.last_outcome == "hit"
    # a different prefix is a miss and goes to the least loaded worker: the other one, since
    # ties break on how many requests each was sent
    other = policy.select(loads(0, 0), key("an unrelated prompt with its own words"))
    assert policy.last_outcome == "miss"
    assert other != first


def test_cache_aware_below_threshold_is_a_miss_to_least_loaded() -> None:
    policy = CacheAwarePolicy(cache_threshold=0.9, block_len=4)
    policy.select(loads(0, 0), key("abcdefgh"))  # goes to A (tie, index 0)
    # half of the key matches A's blocks: under 0.9, so the least loaded worker wins
    chosen = policy.select(loads(3, 1), key("abcdWXYZ"))
    assert policy.last_outcome == "miss"
    assert chosen.url == B


def test_cache_aware_leaves_affinity_when_imbalanced() -> None:
    policy = CacheAwarePolicy(
        cache_threshold=0.5, balance_abs_threshold=4, balance_rel_threshold=2.0, block_len=4
    )
    prompt = key("the same long prompt every time")
    home = policy.select(loads(0, 0), prompt)
    assert home.url == A
    # A busier, but within the thresholds (abs: 4 - 0 is not > 4): affinity holds
    assert policy.select(loads(4, 0), prompt).url == A
    assert policy.last_outcome == "hit"
    # past both thresholds: 10 - 2 > 4 and 10 > 2 * 2; least loaded, even though A has the prefix
    assert policy.select(loads(10, 2), prompt).url == B
    assert policy.last_outcome == "imbalanced"
    # abs past but rel not: 30 - 20 > 4 but 30 < 2 * 20; still balanced, so affinity
    policy.select(loads(30, 20), prompt)
    assert policy.last_outcome == "hit"


def test_cache_aware_picks_the_least_loaded_among_holders() -> None:
    policy = CacheAwarePolicy(balance_abs_threshold=100, block_len=4)
    prompt = key("a prompt both A and C have seen")
    policy.tree.insert(prompt, A)
    policy.tree.insert(prompt, C)
    assert policy.select(loads(5, 0, 2), prompt).url == C
    assert policy.last_outcome == "hit"


def test_cache_aware_ignores_holders_that_are_not_candidates() -> None:
    policy = CacheAwarePolicy(block_len=4)
    prompt = key("only B has seen this prompt")
    policy.tree.insert(prompt, B)
    candidates = [WorkerLoad(A, 0, 0), WorkerLoad(C, 0, 2)]  # B's breaker is open
    assert policy.select(candidates, prompt).url in (A, C)
    assert policy.last_outcome == "miss"


# ---- the others ----------------------------------------------------------------------------


def test_round_robin_takes_turns_and_skips_excluded_workers() -> None:
    policy = RoundRobinPolicy()
    picks = [policy.select(loads(0, 0, 0), []).url for _ in range(4)]
    assert picks == [A, B, C, A]
    without_c = [WorkerLoad(A, 0, 0), WorkerLoad(B, 0, 1)]
    assert [policy.select(without_c, []).url for _ in range(3)] == [B, A, B]


def test_power_of_two_never_picks_the_busier_of_two() -> None:
    policy = PowerOfTwoPolicy(seed=0)
    picks = Counter(policy.select(loads(9, 0), []).url for _ in range(50))
    assert picks == {B: 50}
    picks = Counter(policy.select(loads(5, 0, 1), []).url for _ in range(200))
    assert A not in picks  # A loses to whichever of B or C it is drawn with
    assert picks[B] > 0
    assert picks[C] > 0


def test_random_spreads_over_every_worker() -> None:
    policy = RandomPolicy(seed=0)
    picks = Counter(policy.select(loads(0, 0, 0), []).url for _ in range(300))
    assert set(picks) == {A, B, C}


@pytest.mark.parametrize("name", [p.value for p in PolicyName])
def test_make_policy_builds_each_name(name: str) -> None:
    policy = make_policy(name, seed=1)
    assert policy.name == name
    assert policy.select(loads(0, 0), key("x")).url in (A, B)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"workers": ()}, "workers"),
        ({"workers": ("localhost:1",)}, "workers"),
        ({"workers": (A, A)}, "workers"),
        ({"policy": "least_latency"}, "policy"),
        ({"cache_threshold": 1.5}, "cache_threshold"),
        ({"balance_abs_threshold": -1}, "balance_abs_threshold"),
        ({"balance_rel_threshold": 0.5}, "balance_rel_threshold"),
        ({"max_retries": -1}, "max_retries"),
        ({"breaker_failure_threshold": 0}, "breaker_failure_threshold"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"port": 70000}, "port"),
    ],
)
def test_router_config_names_the_bad_field(kwargs: dict, field: str) -> None:
    args: dict = {"workers": (A, B), **kwargs}
    with pytest.raises(ConfigError) as info:
        RouterConfig(**args)
    assert info.value.field == field
    with pytest.raises(ConfigError, match="policy"):
        make_policy("nope")
