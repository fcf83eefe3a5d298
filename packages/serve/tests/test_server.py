"""The OpenAI API of a real server process on 127.0.0.1, called with the openai client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kvstack.serve import LoadedModel, ServerProcess

# A prompt of token ids in the byte range, and greedy settings that ignore EOS so every request
# generates exactly max_tokens.
PROMPT_IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
IGNORE_EOS = {"ignore_eos": True}
WAIT_S = 30.0


@pytest.fixture
def client(tiny_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as c:
        yield c


def health(server: ServerProcess) -> dict:
    return httpx2.get(f"{server.url}/health", timeout=10).json()


def wait_until_idle(server: ServerProcess) -> dict:
    """Poll /health until no request runs and every block is free; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        state = health(server)
        idle = state["num_requests_running"] == 0 and state["num_requests_waiting"] == 0
        if idle and state["kv_blocks_free"] == state["kv_blocks_total"]:
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {WAIT_S} s: {state}")
        time.sleep(0.05)


def test_models_and_health(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    state = health(tiny_server)
    assert state["status"] == "ok"
    assert state["kv_blocks_total"] == 256  # --num-blocks of the tiny_server fixture


def test_completion_equals_dense_reference(client: openai.OpenAI, tiny: LoadedModel) -> None:
    want = tiny.model.dense_greedy(PROMPT_IDS, 10, stop_ids=frozenset())
    result = client.completions.create(
        model="tiny", prompt=PROMPT_IDS, max_tokens=10, temperature=0, extra_body=IGNORE_EOS
    )
    assert result.choices[0].text == tiny.tokenizer.decode(want)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(PROMPT_IDS), 10)


def test_streaming_matches_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "prompt": "Streaming test prompt",
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = client.completions.create(**kwargs, extra_body=IGNORE_EOS)
    chunks = list(
        client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body=IGNORE_EOS
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 12
    # The same prompt again: its full blocks come from the prefix cache.
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_chat_streaming_and_not(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body=IGNORE_EOS
    )
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_equal_sequential_ones(tiny_server: ServerProcess) -> None:
    prompts = [[40 + i, 50 + i, 60 + i] * (i + 1) for i in range(8)]

    async def run(concurrently: bool) -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0
        ) as c:

            async def one(prompt: list[int]) -> str:
                r = await c.completions.create(
                    model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=IGNORE_EOS
                )
                return r.choices[0].text

            if concurrently:
                return list(await asyncio.gather(*(one(p) for p in prompts)))
            return [await one(p) for p in prompts]

    assert asyncio.run(run(True)) == asyncio.run(run(False))
    wait_until_idle(tiny_server)


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "match"),
    [
        ({"model": "gpt-4"}, 404, "model", "not served here"),
        ({"prompt": "x" * 2000}, 400, "prompt", "exceeds the context length of 1024"),
        ({"temperature": 5}, 400, "temperature", "must be in \\[0, 2\\]"),
        ({"top_p": 0}, 400, "top_p", "must be in \\(0, 1\\]"),
        ({"max_tokens": 0}, 400, "max_tokens", "positive integer"),
        ({"n": 2}, 400, "n", "only n=1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ],
)
def test_bad_parameters_get_openai_errors(
    client: openai.OpenAI, kwargs: dict, status: int, param: str, match: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        # extra_body overrides the typed fields, so the server sees the bad values as given
        client.completions.create(model="tiny", prompt="hello", max_tokens=4, extra_body=kwargs)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == param
    assert body["type"] == "invalid_request_error"
    assert caught.match(match)


def test_malformed_bodies_and_routes(tiny_server: ServerProcess) -> None:
    url = tiny_server.url
    cases = [
        ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "/v1/completions", b'{"model": "tiny"}', 400, "prompt"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": []}',
            400,
            "at least one message",
        ),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "robot",
        ),
        ("GET", "/v1/nothing", b"", 404, "Not Found"),
    ]
    for method, path, body, status, text in cases:
        response = httpx2.request(method, url + path, content=body, timeout=10)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert text in error["message"], (path, body, error)
        assert set(error) == {"message", "type", "param", "code"}


def aborted_requests(server: ServerProcess) -> float:
    text = httpx2.get(f"{server.url}/metrics", timeout=10).text
    prefix = 'kvstack_serve_requests_total{finish_reason="abort",model="tiny"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_disconnect_mid_stream_frees_blocks(tiny_server: ServerProcess) -> None:
    wait_until_idle(tiny_server)
    aborted = aborted_requests(tiny_server)
    body = {"model": "tiny", "prompt": "x" * 100, "max_tokens": 900, "stream": True, **IGNORE_EOS}
    with (
        httpx2.Client(base_url=tiny_server.url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # keep a reference: dropping it closes the stream
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
    # Leaving the block closed the connection mid-stream (900 tokens were asked for).
    state = wait_until_idle(tiny_server)
    assert state["kv_blocks_free"] == state["kv_blocks_total"]
    assert aborted_requests(tiny_server) == aborted + 1


def test_disconnect_before_a_non_streamed_reply_frees_blocks(tiny_server: ServerProcess) -> None:
    wait_until_idle(tiny_server)
    aborted = aborted_requests(tiny_server)
    body = {"model": "tiny", "prompt": "y", "max_tokens": 1000, **IGNORE_EOS}
    # The client gives up long before 1000 tokens can be generated and closes its connection.
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(
            f"{tiny_server.url}/v1/completions", json=body, timeout=httpx2.Timeout(10, read=0.2)
        )
    state = wait_until_idle(tiny_server)
    assert state["kv_blocks_free"] == state["kv_blocks_total"]
    assert aborted_requests(tiny_server) == aborted + 1


def test_metrics_expose_latency_queues_kv_and_prefix(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    client.completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    text = httpx2.get(f"{tiny_server.url}/metrics", timeout=10).text
    for series in (
        "kvstack_serve_time_to_first_token_seconds_count",
        "kvstack_serve_inter_token_latency_seconds_count",
        "kvstack_serve_num_requests_running",
        "kvstack_serve_num_requests_waiting",
        "kvstack_serve_kv_cache_usage_ratio",
        "kvstack_serve_prefix_cache_hit_rate",
        "kvstack_serve_prefix_cache_hit_tokens_total",
    ):
        assert f"{series}{{" in text, series
    ttft_count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("kvstack_serve_time_to_first_token_seconds_count")
    )
    assert ttft_count >= 1


def test_smollm2_server_answers_a_chat() -> None:
    with ServerProcess.start(
        ["--model", "smollm2", "--port", "0", "--kv-cache-size", "64MiB"]
    ) as server:
        with openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as c:
            model = c.models.list().data[0].id
            assert model == "SmolLM2-135M-Instruct"
            reply = c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=20,
                temperature=0,
            )
        assert "Paris" in (reply.choices[0].message.content or "")
        assert reply.choices[0].finish_reason == "stop"
    assert server.proc.returncode == 0
