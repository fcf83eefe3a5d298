"""Disaggregation and global prefix reuse inside one process: real engines, a real store.

The handoff's byte path is exercised as the workers run it (block-major pages, coalesced runs);
the HTTP flow, failures and the router are in test_pd_cluster.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch

from kvstack.serve import EngineConfig, LLMEngine, LoadedModel, SamplingParams
from kvstack.serve._async_engine import AsyncEngine
from kvstack.serve._disagg import (
    HandoffTimings,
    KVLayout,
    KVSpace,
    PrefillService,
    coalesce_runs,
)
from kvstack.serve._engine import kv_cache_size
from kvstack.serve._kv_cache import chain_hashes
from kvstack.serve._store_cache import store_key
from kvstack.serve.errors import HandoffError, InvalidRequest, KVLayoutMismatch
from kvstack.store import StoreClient

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def _engine(tiny: LoadedModel, *, num_blocks: int = 64, block_size: int = 16) -> LLMEngine:
    config = EngineConfig(num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=64)
    return LLMEngine(tiny, config)


def _prompts(count: int, *, seed: int, vocab: int, shared: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (shared,), generator=gen).tolist()
    lengths = torch.randint(1, 70, (count,), generator=gen).tolist()
    return [prefix + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _handoff(
    prefill: LLMEngine,
    decode: LLMEngine,
    rid: str,
    prompt: list[int],
    params: SamplingParams = GREEDY,
) -> list[int]:
    """One PD request through the engines' own API, copying blocks as the push does."""
    blocks = decode.reserve(rid, prompt, params)
    assert blocks is not None
    first = SamplingParams(
        max_tokens=1,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        ignore_eos=True,
    )
    prefill.add_request(rid, prompt, first, hold_blocks=True)
    outs = []
    while not outs or not outs[-1].finished:
        outs.extend(o for o in prefill.step() if o.request_id == rid)
    held = outs[-1].held_block_ids
    assert len(held) == len(blocks)
    for src, dst, n in coalesce_runs(held, blocks):
        decode.cache.blocks[dst : dst + n].copy_(prefill.cache.blocks[src : src + n])
    assert prefill.release_held(rid)
    tokens = list(decode.activate(rid, outs[-1].new_token_ids[0]).new_token_ids)
    while decode.has_unfinished():
        tokens.extend(t for o in decode.step() if o.request_id == rid for t in o.new_token_ids)
    return tokens


def test_handoff_through_block_pages_equals_colocated(tiny: LoadedModel) -> None:
    vocab = tiny.model.config.vocab_size
    prompts = _prompts(12, seed=1, vocab=vocab, shared=20)
    colocated = _engine(tiny).generate(prompts, GREEDY)
    prefill, decode = _engine(tiny), _engine(tiny)
    for index, prompt in enumerate(prompts):
        assert _handoff(prefill, decode, f"r{index}", prompt) == colocated[index]
    for engine in (prefill, decode):
        stats = engine.stats()
        assert stats.kv.num_free_blocks == stats.kv.num_blocks
        assert (stats.num_transferring, stats.num_held) == (0, 0)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_seeded_sampling_after_a_handoff_equals_colocated(tiny: LoadedModel, top_p: float) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=top_p, seed=7, ignore_eos=True)
    prompts = _prompts(4, seed=6, vocab=tiny.model.config.vocab_size)
    want = [_engine(tiny).generate([p], params)[0] for p in prompts]
    prefill, decode = _engine(tiny), _engine(tiny)
    got = [_handoff(prefill, decode, f"s{i}", p, params) for i, p in enumerate(prompts)]
    assert got == want


def test_reserve_waits_for_blocks_and_abort_frees_them(tiny: LoadedModel) -> None:
    decode = _engine(tiny, num_blocks=4)
    assert decode.reserve("a", list(range(40)), GREEDY) == [0, 1, 2]
    assert decode.reserve("b", list(range(30)), GREEDY) is None  # 2 blocks needed, 1 free
    assert decode.stats().num_transferring == 1
    assert decode.abort("a")
    assert decode.reserve("b", list(range(30)), GREEDY) is not None
    with pytest.raises(InvalidRequest, match="not reserved"):
        decode.activate("nope", 1)
    with pytest.raises(InvalidRequest, match="first_token"):
        decode.activate("b", -1)
    assert decode.stats().kv.num_free_blocks == 4  # a bad first token aborts the request


def test_layout_mismatch_names_the_field(tiny: LoadedModel) -> None:
    ours = KVLayout.of(_engine(tiny))
    theirs = KVLayout.of(_engine(tiny, block_size=8))
    ours.check(KVLayout.from_wire(_wire(ours)))
    with pytest.raises(KVLayoutMismatch, match="block_size"):
        ours.check(theirs)
    with pytest.raises(InvalidRequest, match=r"layout\.head_dim"):
        KVLayout.from_wire({**_wire(ours), "head_dim": "64"})


def _wire(layout: KVLayout) -> dict[str, object]:
    return {name: getattr(layout, name) for name in KVLayout.__dataclass_fields__}


def test_coalesce_runs_and_timings_header() -> None:
    assert coalesce_runs([3, 4, 5, 9, 10], [7, 8, 2, 3, 4]) == [(3, 7, 2), (5, 2, 1), (9, 3, 2)]
    assert coalesce_runs([], []) == []
    timings = HandoffTimings(prefill_s=0.5, transfer_bytes=4096)
    assert HandoffTimings.parse(timings.header()) == timings
    assert HandoffTimings.parse("not json") is None


def test_store_reuse_across_engines_gives_identical_tokens(tiny: LoadedModel) -> None:
    vocab = tiny.model.config.vocab_size
    prompts = _prompts(6, seed=2, vocab=vocab, shared=48)
    with StoreClient.embedded("64MiB") as store:
        first = LLMEngine(tiny, EngineConfig(num_blocks=64), store=store)
        want = first.generate(prompts, GREEDY)
        assert first.store is not None
        assert first.store.flush()
        saved = first.store.stats()
        assert saved.saved_blocks > 0
        assert saved.errors == 0
        first.close()

        second = LLMEngine(tiny, EngineConfig(num_blocks=64), store=store)
        assert second.generate(prompts, GREEDY) == want
        stats = second.stats()
        assert second.store is not None
        loaded = second.store.stats()
        # Every full block of the shared prefix (and more) came from the store, not compute.
        assert stats.store_hit_tokens >= 48
        assert loaded.loaded_blocks * 16 == stats.store_hit_tokens
        assert loaded.bytes_read == loaded.loaded_blocks * second.cache.block_nbytes
        second.close()


def test_store_block_that_vanished_is_recomputed(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = tiny.model.config.vocab_size
    [prompt] = _prompts(1, seed=3, vocab=vocab, shared=64)
    with StoreClient.embedded("64MiB") as store:
        first = LLMEngine(tiny, EngineConfig(num_blocks=64), store=store)
        want = first.generate([prompt], GREEDY)
        assert first.store is not None
        assert first.store.flush()
        first.close()
        second = LLMEngine(tiny, EngineConfig(num_blocks=64), store=store)
        keys = [store_key(h) for h in chain_hashes(second.scheduler.root_hash, prompt, 16)]
        assert all(store.exists(k) for k in keys)
        assert second.store is not None
        original = second.store.lookup

        def lookup_then_remove(digests: list[bytes]) -> int:
            found = original(digests)
            store.remove_batch(keys)  # found by lookup, gone before the read
            return found

        monkeypatch.setattr(second.store, "lookup", lookup_then_remove)
        assert second.generate([prompt], GREEDY) == want  # computed, not trusted
        assert second.stats().store_hit_tokens == 0
        second.close()


def test_smollm2_handoff_and_store_paths_match_colocated(smollm2: LoadedModel) -> None:
    # The smaller run with the real model: greedy tokens equal across colocated, PD handoff,
    # local prefix hit and store hit.
    vocab = smollm2.model.config.vocab_size
    prompts = _prompts(4, seed=5, vocab=vocab, shared=40)
    colocated = _engine(smollm2).generate(prompts, GREEDY)
    prefill, decode = _engine(smollm2), _engine(smollm2)
    for rounds in range(2):  # the second round hits the prefill side's prefix cache
        for index, prompt in enumerate(prompts):
            assert _handoff(prefill, decode, f"r{rounds}-{index}", prompt) == colocated[index]
    assert prefill.stats().kv.prefix_hit_tokens > 0
    with StoreClient.embedded("128MiB") as store:
        first = LLMEngine(smollm2, EngineConfig(num_blocks=64), store=store)
        first.generate(prompts, GREEDY)
        assert first.store is not None
        assert first.store.flush()
        first.close()
        second = LLMEngine(smollm2, EngineConfig(num_blocks=64), store=store)
        assert second.generate(prompts, GREEDY) == colocated
        assert second.stats().store_hit_tokens > 0
        second.close()


def _service(tiny: LoadedModel, metadata: str) -> tuple[AsyncEngine, KVSpace, PrefillService]:
    config = EngineConfig(num_blocks=32, max_num_batched_tokens=64)
    num_blocks, block_nbytes = kv_cache_size(tiny, config)
    space = KVSpace.create(metadata, nbytes=num_blocks * block_nbytes, device=torch.device("cpu"))
    engine = AsyncEngine(LLMEngine(tiny, config, kv_memory=space.memory))
    engine.start()
    return engine, space, PrefillService(engine, space, push_timeout_s=5.0)


def test_prefill_service_pushes_refuses_and_aborts(tiny: LoadedModel) -> None:
    # Real engines and a real transfer engine pair (shared memory), driven without HTTP.
    metadata = f"memory://pd-{uuid.uuid4().hex}"
    engine, space, service = _service(tiny, metadata)
    decode_engine, decode_space, decode_service = _service(tiny, metadata)
    layout = {k: getattr(service.layout, k) for k in KVLayout.__dataclass_fields__}
    prompt = list(range(40, 90))

    def handshake(request_id: str, blocks: list[int]) -> dict[str, object]:
        return {
            "request_id": request_id,
            "prompt_token_ids": prompt,
            "layout": layout,
            "segment": decode_space.segment,
            "block_ids": blocks,
            "deadline_s": 5,
        }

    async def scenario() -> None:
        answer = await service.handle(handshake("ok", [7, 8, 9, 10]))
        assert answer["transfer_bytes"] == 4 * service.layout.block_nbytes
        local = LLMEngine(tiny, EngineConfig(num_blocks=32, max_num_batched_tokens=64))
        local.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        for mine, theirs in zip(range(4), (7, 8, 9, 10), strict=True):
            want = local.cache.blocks[mine]
            got = decode_engine.engine.cache.blocks[theirs]
            if mine < 3:  # full blocks; the last one holds 2 tokens and stale bytes after them
                assert torch.equal(got, want)
        # Aborted before its handshake arrives: the handshake is refused, nothing is held.
        assert not await service.abort("late")
        with pytest.raises(HandoffError, match="aborted"):
            await service.handle(handshake("late", [0, 1, 2, 3]))
        # Aborted while running: abort returns once nothing more can be written.
        running = asyncio.create_task(service.handle(handshake("mid", [0, 1, 2, 3])))
        await asyncio.sleep(0)
        assert await service.abort("mid")
        with pytest.raises(asyncio.CancelledError):
            await running
        with pytest.raises(KVLayoutMismatch, match="block_size"):
            await service.handle({**handshake("bad", [0]), "layout": {**layout, "block_size": 8}})
        # The push itself refused: blocks past the decoder's segment, or no such segment.
        with pytest.raises(HandoffError, match=r"KV push failed: .*exceeds segment"):
            await service.handle(handshake("past-end", [7, 8, 9, 32]))
        with pytest.raises(HandoffError, match=r"KV push failed: .*not found"):
            await service.handle({**handshake("gone", [7, 8, 9, 10]), "segment": "no-such-kv"})

    try:
        asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while engine.stats.num_held or engine.stats.kv.num_free_blocks != 32:
            assert time.monotonic() < deadline, engine.stats
            time.sleep(0.01)
    finally:
        for e, s, svc in ((engine, space, service), (decode_engine, decode_space, decode_service)):
            svc.close()
            e.close()
            s.close()
