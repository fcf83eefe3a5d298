"""The engine against the dense reference: paging, batching, chunking, preemption and prefix
reuse never change greedy output; blocks never leak."""

from __future__ import annotations

import random

import pytest
import torch

from kvstack.serve import (
    ChatMessage,
    EngineConfig,
    FinishReason,
    InvalidRequest,
    LLMEngine,
    LoadedModel,
    PromptTooLong,
    RequestOutput,
    SamplingParams,
)

MAX_TOKENS = 16
# Prompt lengths around the block size (16) edges, then longer ones that span many blocks.
PROMPT_LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 50, 64, 65, 70, 80, 96, 100, 110, 120, 127]

ENGINE_CONFIGS = {
    # Everything fits: one batch, whole prompts per step.
    "roomy": EngineConfig(num_blocks=512, max_num_batched_tokens=2048),
    # A 24-token budget splits prefills into chunks that share steps with decodes.
    "chunked": EngineConfig(num_blocks=512, max_num_batched_tokens=24),
    # 24 blocks of 8 tokens cannot hold the batch: requests get preempted and recomputed.
    "preempting": EngineConfig(num_blocks=24, block_size=8, max_num_batched_tokens=64),
    # No batching at all.
    "one-at-a-time": EngineConfig(num_blocks=512, max_num_seqs=1),
}

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(32, 127, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def dense(tiny: LoadedModel, prompts: list[list[int]]) -> list[list[int]]:
    return [tiny.model.dense_greedy(p, MAX_TOKENS, stop_ids=frozenset()) for p in prompts]


def assert_no_leak(engine: LLMEngine) -> None:
    pool = engine.pool
    assert not engine.has_unfinished()
    assert pool.num_free == pool.num_blocks, "blocks still referenced after every request ended"
    assert all(count == 0 for count in pool.ref_counts)
    for block, digest in enumerate(pool.hashes):
        if digest is not None:
            assert pool.lookup(digest) == block


@pytest.mark.parametrize("name", list(ENGINE_CONFIGS))
def test_greedy_equals_dense_forward(
    name: str, tiny: LoadedModel, prompts: list[list[int]], dense: list[list[int]]
) -> None:
    engine = LLMEngine(tiny, ENGINE_CONFIGS[name])
    first = engine.generate(prompts, GREEDY)
    for index, (got, want) in enumerate(zip(first, dense, strict=True)):
        assert got == want, f"prompt {index} ({len(prompts[index])} tokens) diverged"
    assert_no_leak(engine)
    # Again, now from the prefix cache (where it survived): the same tokens.
    hits_before = engine.pool.prefix_hit_tokens
    assert engine.generate(prompts, GREEDY) == dense
    if name != "preempting":
        assert engine.pool.prefix_hit_tokens > hits_before
    assert_no_leak(engine)
    if name == "preempting":
        assert engine.scheduler.num_preemptions > 0


def test_shared_prefix_is_reused_without_changing_output(tiny: LoadedModel) -> None:
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(32, 127, (70,), generator=gen).tolist()
    prompts = [prefix + torch.randint(32, 127, (n,), generator=gen).tolist() for n in (3, 9, 20)]
    want = [tiny.model.dense_greedy(p, 8, stop_ids=frozenset()) for p in prompts]
    engine = LLMEngine(tiny, EngineConfig(num_blocks=128))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = [engine.generate([p], params)[0] for p in prompts]
    assert got == want
    # 70 shared tokens = 4 full blocks of 16, reused by the second and third prompts.
    assert engine.pool.prefix_hit_tokens == 2 * 64
    assert_no_leak(engine)


def test_no_leak_after_many_requests_and_aborts(tiny: LoadedModel) -> None:
    rng = random.Random(7)
    engine = LLMEngine(tiny, EngineConfig(num_blocks=40, block_size=8, max_num_batched_tokens=48))
    live: set[str] = set()
    finished = 0
    for index in range(120):
        length = rng.randrange(1, 90)
        params = SamplingParams(max_tokens=rng.randrange(1, 24), ignore_eos=True)
        rid = f"r{index}"
        # Some prompts share a prefix, so aborted requests also drop shared, cached blocks.
        prompt = (
            [40 + (i % 7) for i in range(length)]
            if index % 3
            else [rng.randrange(32, 127) for _ in range(length)]
        )
        engine.add_request(rid, prompt, params)
        live.add(rid)
        for _ in range(rng.randrange(0, 4)):
            for out in engine.step():
                if out.finished:
                    live.discard(out.request_id)
                    finished += 1
        if live and rng.random() < 0.4:
            victim = rng.choice(sorted(live))
            assert engine.abort(victim)
            live.discard(victim)
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            live.discard(out.request_id)
    assert not live
    assert finished > 10
    assert not engine.abort("r0")  # already gone
    assert_no_leak(engine)


def _run(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    engine.add_request("one", prompt, params)
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_seeded_sampling_is_reproducible_and_top_p_narrows(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    a = LLMEngine(tiny, EngineConfig(num_blocks=64)).generate([prompts[5]], params)
    # Batched with others this time: a request's own generator keeps its draws its own.
    b = LLMEngine(tiny, EngineConfig(num_blocks=256)).generate([prompts[5], prompts[6]], params)[0]
    assert a[0] == b
    narrow = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True
    )
    greedy = LLMEngine(tiny, EngineConfig(num_blocks=64)).generate([prompts[5]], GREEDY)
    assert LLMEngine(tiny, EngineConfig(num_blocks=64)).generate([prompts[5]], narrow) == greedy


def test_stop_token_and_max_tokens(
    tiny: LoadedModel, prompts: list[list[int]], dense: list[list[int]]
) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=64))
    want = dense[8]
    stop_at = next(i for i in range(2, MAX_TOKENS) if want[i] not in want[:i])
    params = SamplingParams(
        max_tokens=MAX_TOKENS, stop_token_ids=frozenset({want[stop_at]}), ignore_eos=True
    )
    outputs = _run(engine, prompts[8], params)
    assert [o.new_token_ids[0] for o in outputs] == want[: stop_at + 1]
    assert outputs[-1].finish_reason is FinishReason.STOP
    outputs = _run(engine, prompts[8], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(outputs) == 3
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert outputs[-1].completion_tokens == 3
    assert_no_leak(engine)


def test_invalid_requests_are_refused_before_queueing(tiny: LoadedModel) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=64))  # 1024 tokens of cache
    with pytest.raises(
        PromptTooLong, match="1020 tokens plus max_tokens=16 exceeds the context length of 1024"
    ):
        engine.add_request("long", [65] * 1020, SamplingParams(max_tokens=16))
    with pytest.raises(InvalidRequest, match="must not be empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request("oov", [5, 99999], SamplingParams())
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert not engine.has_unfinished()


SMOLLM2_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]


def test_smollm2_engine_equals_dense_and_stops_on_strings(smollm2: LoadedModel) -> None:
    tok = smollm2.tokenizer
    prompts = [
        tok.encode(smollm2.chat_template.render([ChatMessage("user", q)]))
        for q in SMOLLM2_QUESTIONS
    ]
    eos = frozenset({tok.eos_token_id})
    want = [smollm2.model.dense_greedy(p, 12, stop_ids=eos) for p in prompts]
    # Chunked prefill (budget 24) batched with decodes, then again from the prefix cache.
    engine = LLMEngine(smollm2, EngineConfig(num_blocks=64, max_num_batched_tokens=24))
    params = SamplingParams(max_tokens=12)
    assert engine.generate(prompts, params) == want
    assert engine.generate(prompts, params) == want
    assert engine.pool.prefix_hit_tokens > 0
    outputs = _run(engine, prompts[0], SamplingParams(max_tokens=20, stop=("Paris",)))
    assert "".join(o.text for o in outputs) == "The capital of France is "
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert_no_leak(engine)
