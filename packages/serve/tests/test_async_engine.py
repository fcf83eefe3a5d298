"""The engine thread: streams to asyncio callers, aborts on cancel, fails loudly on close."""

from __future__ import annotations

import asyncio

import pytest

from kvstack.serve import (
    AsyncEngine,
    ConfigError,
    EngineConfig,
    EngineStopped,
    LLMEngine,
    LoadedModel,
    PromptTooLong,
    SamplingParams,
    ServerConfig,
    parse_size,
)

# Every await below is bounded, so a wedged engine thread fails the test instead of hanging it.
DEADLINE_S = 30.0


@pytest.fixture
def engine(tiny: LoadedModel) -> AsyncEngine:
    return AsyncEngine(LLMEngine(tiny, EngineConfig(num_blocks=64)))


def test_streams_outputs_and_cancellation_aborts(engine: AsyncEngine) -> None:
    engine.start()

    async def scenario() -> None:
        params = SamplingParams(max_tokens=5, ignore_eos=True)
        outputs = [out async for out in engine.generate("a", [65, 66, 67], params)]
        assert [o.completion_tokens for o in outputs] == [1, 2, 3, 4, 5]
        assert outputs[-1].finished
        with pytest.raises(PromptTooLong):
            async for _ in engine.generate("b", [65] * 1020, params):
                pass
        # A consumer that stops early (a client gone) aborts the request and frees its blocks.
        long = SamplingParams(max_tokens=500, ignore_eos=True)
        stream = engine.generate("c", [65] * 20, long)
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    engine.close(timeout_s=DEADLINE_S)
    assert not engine.alive
    pool = engine.engine.pool
    assert pool.num_free == pool.num_blocks
    assert not engine.engine.has_unfinished()


def test_close_ends_pending_requests_with_engine_stopped(engine: AsyncEngine) -> None:
    engine.start()

    async def scenario() -> None:
        stream = engine.generate("a", [65] * 20, SamplingParams(max_tokens=900, ignore_eos=True))
        await anext(stream)
        engine.close(timeout_s=DEADLINE_S)
        with pytest.raises(EngineStopped, match="closed"):
            async for _ in stream:
                pass
        with pytest.raises(EngineStopped):
            await anext(engine.generate("b", [65], SamplingParams()))

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: EngineConfig(block_size=0), "block_size"),
        (lambda: EngineConfig(max_num_seqs=-1), "max_num_seqs"),
        (lambda: EngineConfig(dtype="int8"), "dtype"),
        (lambda: EngineConfig(attention_backend="flash"), "attention_backend"),
        (lambda: ServerConfig(port=70000), "port"),
        (lambda: ServerConfig(request_timeout_s=0), "request_timeout_s"),
    ],
)
def test_config_errors_name_the_field(make: object, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make()  # pyrefly: ignore[not-callable]  # each case is a lambda building a config
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}=")


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5kB") == 1500
    assert parse_size("1000") == 1000
    with pytest.raises(ConfigError, match="'lots'"):
        parse_size("lots")
