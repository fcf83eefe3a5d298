"""The router over real tiny-model worker processes on 127.0.0.1, called with the openai client.

Worker faults that a real server cannot be made to produce on cue (answering nothing, dying after
the first SSE event, hanging) come from ``FaultyWorker``, a raw TCP server in this process.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx2
import openai
import pytest

from kvstack.serve import TRACE_HEADER, WORKER_HEADER, RouterConfig, ServerProcess, run_router

IGNORE_EOS = {"ignore_eos": True}
# FaultyWorker's chunked answers: (body, chunk size). "trickle": past the router's 64 KiB
# read-ahead, so it pauses and resumes reading; "one_write": small enough that the headers and
# every chunk arrive in one read, so the whole answer is in before the first chunk is taken.
CHUNKED_ANSWERS = {
    "trickle": (json.dumps({"id": "cmpl-t", "text": "x" * 300_000}).encode(), 7919),
    "one_write": (json.dumps({"id": "cmpl-o", "text": "y" * 2000}).encode(), 97),
}
WAIT_S = 30.0
# Long enough that the shared part spans many 16-character blocks of the router's tree and many
# 16-token KV blocks of the workers (the tiny model's tokenizer is byte level).
SYSTEM = [
    "You are a terse assistant for a ship's engine room. Answer in one line. " * 3,
    "Translate every sentence into French and explain one grammar point of it. " * 3,
]


class RouterThread:
    """``run_router`` on its own event loop in a thread: a real server on 127.0.0.1 that starts
    in milliseconds (httpx's ``serve_in_thread``), so each test can have a router of its own."""

    def __init__(self, workers: Sequence[str], **options: Any) -> None:
        self.config = RouterConfig(workers=tuple(workers), port=0, **options)
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-router", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def on_ready(url: str) -> None:
                self.url = url
                self._ready.set()

            await run_router(self.config, on_ready=on_ready, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by __enter__ or __exit__
            self._error = exc
            self._ready.set()

    def __enter__(self) -> RouterThread:
        self._thread.start()
        if not self._ready.wait(WAIT_S) or self._error is not None:
            raise RuntimeError(f"router did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"router at {self.url} did not stop within {WAIT_S} s")
        if self._error is not None:
            raise self._error


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the router's /metrics (0 when absent)."""
    text = httpx2.get(f"{url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            have = ",".join(sorted(match.group(2).split(","))) if match.group(2) else ""
            if have == want:
                return float(match.group(3))
    return 0.0


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def workers(tiny_server: ServerProcess) -> Iterator[list[str]]:
    """Two tiny workers: the session's and one of our own."""
    args = ["--model", "tiny", "--port", "0", "--num-blocks", "256"]
    with ServerProcess.start(args, ready_timeout_s=120) as second:
        yield [tiny_server.url, second.url]


@pytest.fixture
def router(workers: list[str]) -> Iterator[RouterThread]:
    with RouterThread(workers, policy="cache_aware") as r:
        yield r


# ---- a worker that fails on cue --------------------------------------------------------------


class FaultyWorker:
    """Answers GET /health with 200; each POST per ``mode``: ``silent`` closes the connection
    without a byte, ``mid_stream`` sends 200 and one SSE event then closes, ``short_body`` sends
    a JSON response cut short, ``hang`` never answers, ``trickle`` and ``one_write`` answer 200
    with ``connection: close`` and their ``CHUNKED_ANSWERS`` body in many chunks, written one by
    one or all at once. Records each POST's headers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.posts: list[dict[str, str]] = []
        self._release = threading.Event()
        faulty = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    request_line = self.rfile.readline().decode()
                    if not request_line:
                        return
                    headers: dict[str, str] = {}
                    while (line := self.rfile.readline().decode().strip()) != "":
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    self.rfile.read(int(headers.get("content-length", "0")))
                    if request_line.startswith("GET"):
                        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                        continue
                    faulty.posts.append(headers)
                    faulty.answer(self.wfile)
                    return  # every fault ends the connection

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def answer(self, out: io.BufferedIOBase) -> None:
        if self.mode == "mid_stream":
            choice = {"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None}
            event = {"id": "x", "object": "text_completion", "created": 0, "choices": [choice]}
            chunk = f"data: {json.dumps(event)}\n\n".encode()
            out.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                + f"{len(chunk):x}\r\n".encode()
                + chunk
                + b"\r\n"
            )
        elif self.mode == "short_body":
            out.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b'content-length: 500\r\n\r\n{"id": "cmpl-x", "choices": ['
            )
        elif self.mode == "hang":
            self._release.wait(WAIT_S)
        elif self.mode in ("trickle", "one_write"):
            parts = [
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"x-kvstack-extra: not relayed\r\n"
                b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            ]
            body, size = CHUNKED_ANSWERS[self.mode]
            for i in range(0, len(body), size):
                piece = body[i : i + size]
                parts.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            parts.append(b"0\r\n\r\n")
            for part in parts if self.mode == "trickle" else [b"".join(parts)]:
                out.write(part)
                out.flush()
        out.flush()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def faulty(request: pytest.FixtureRequest) -> Iterator[FaultyWorker]:
    worker = FaultyWorker(request.param)
    try:
        yield worker
    finally:
        worker.close()


# ---- the API through the router ---------------------------------------------------------------


def test_greedy_output_through_the_router_equals_direct(
    router: RouterThread, workers: list[str]
) -> None:
    prompt = "The quick brown fox"
    messages: list = [{"role": "user", "content": "Say something."}]
    with client_for(router.url) as via, client_for(workers[1]) as direct:
        want = direct.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=IGNORE_EOS
        )
        whole = via.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=IGNORE_EOS
        )
        assert whole.choices[0].text == want.choices[0].text
        pieces = via.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0,
            extra_body=IGNORE_EOS, stream=True,
        )  # fmt: skip
        assert "".join(c.choices[0].text for c in pieces) == want.choices[0].text
        chat_direct = direct.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body=IGNORE_EOS
        )
        chat_via = via.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body=IGNORE_EOS
        )
        assert chat_via.choices[0].message.content == chat_direct.choices[0].message.content
        chat_pieces = via.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0,
            extra_body=IGNORE_EOS, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(chat_pieces)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == chat_direct.choices[0].message.content
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens == 8


def test_router_process_serves_models_health_metrics_and_trace_ids(workers: list[str]) -> None:
    args = [arg for url in workers for arg in ("--worker", url)]
    with ServerProcess.start([*args, "--port", "0"], command="router", ready_timeout_s=60) as r:
        with client_for(r.url) as client:
            assert [m.id for m in client.models.list().data] == ["tiny"]
        health = httpx2.get(f"{r.url}/health", timeout=10).json()
        assert health["status"] == "ok"
        assert health["policy"] == "cache_aware"
        assert [w["url"] for w in health["workers"]] == workers
        assert [w["breaker"] for w in health["workers"]] == ["closed", "closed"]
        body = {"model": "tiny", "prompt": "trace me", "max_tokens": 2}
        response = httpx2.post(
            f"{r.url}/v1/completions", json=body, headers={TRACE_HEADER: "t-123"}, timeout=60
        )
        assert response.status_code == 200
        assert response.headers[TRACE_HEADER] == "t-123"
        assert response.headers[WORKER_HEADER] in workers
        fresh = httpx2.post(f"{r.url}/v1/completions", json=body, timeout=60)
        assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers[TRACE_HEADER])
        text = httpx2.get(f"{r.url}/metrics", timeout=10).text
        for series in (
            "kvstack_router_requests_total",
            "kvstack_router_breaker_state",
            "kvstack_router_requests_in_flight",
            "kvstack_router_cache_aware_decisions_total",
            "kvstack_router_routing_seconds_bucket",
            "kvstack_router_request_duration_seconds_bucket",
        ):
            assert series in text
    assert r.proc.returncode == 0


def test_bad_input_comes_back_as_openai_errors(router: RouterThread) -> None:
    with client_for(router.url) as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
        assert unknown.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model="tiny", prompt="x" * 2000, max_tokens=2)
        assert too_long.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="top_p"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, top_p=5.0)
    garbage = httpx2.post(f"{router.url}/v1/chat/completions", content=b"{not", timeout=60)
    assert garbage.status_code == 400
    assert garbage.json()["error"]["type"] == "invalid_request_error"
    # a client error is the request's fault, not the worker's: no retry, breakers stay closed
    assert metric(router.url, "kvstack_router_retries_total") == 0
    breakers = [
        w["breaker"] for w in httpx2.get(f"{router.url}/health", timeout=10).json()["workers"]
    ]
    assert breakers == ["closed", "closed"]


# ---- policies end to end ----------------------------------------------------------------------


def route_groups(url: str) -> dict[int, list[tuple[str, int]]]:
    """Send 3 prompts of one shared-prefix group, then 3 of the other, one at a time: (worker,
    cached tokens) of each."""
    out: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    with client_for(url) as client:
        for group, system in enumerate(SYSTEM):
            for question in ("Where is the fuel pump?", "Why is it hot?", "What is that noise?"):
                raw = client.completions.with_raw_response.create(
                    model="tiny", prompt=system + question, max_tokens=1, extra_body=IGNORE_EOS
                )
                usage = raw.parse().usage
                assert usage is not None
                details = usage.prompt_tokens_details
                cached = (details.cached_tokens or 0) if details is not None else 0
                out[group].append((raw.headers[WORKER_HEADER], cached))
    return out


def test_cache_aware_keeps_each_shared_prefix_on_one_worker(router: RouterThread) -> None:
    groups = route_groups(router.url)
    homes = {g: {w for w, _ in routed} for g, routed in groups.items()}
    assert all(len(h) == 1 for h in homes.values()), homes
    assert homes[0] != homes[1], "two groups on idle workers should spread, not pile up"
    # the second and third prompt of each group found their prefix in that worker's KV cache
    for routed in groups.values():
        assert all(cached >= 16 * 8 for _, cached in routed[1:]), routed
    assert metric(router.url, "kvstack_router_cache_aware_decisions_total", outcome="hit") == 4
    assert metric(router.url, "kvstack_router_cache_aware_decisions_total", outcome="miss") == 2


def test_round_robin_splits_a_shared_prefix(workers: list[str]) -> None:
    with RouterThread(workers, policy="round_robin") as router:
        groups = route_groups(router.url)
    for routed in groups.values():  # turns alternate, so each group lands on both workers
        assert len({w for w, _ in routed}) == 2


# ---- failures ------------------------------------------------------------------------------


def test_up_workers_cluster_survives_a_killed_worker_and_stops_cleanly() -> None:
    """``up --workers 2``: a routed cluster; SIGKILL one worker, its breaker opens and traffic
    moves to the other; SIGTERM stops the router and the surviving worker."""
    args = ["--model", "tiny", "--port", "0", "--num-blocks", "64", "--workers", "2"]
    # round robin sends every other request to the dead worker until its breaker opens; no
    # periodic probe or cooldown within the test, so only real requests move the breaker
    args += ["--policy", "round_robin", "--breaker-failure-threshold", "2"]
    args += ["--breaker-cooldown", "600", "--health-check-interval", "600"]
    with (
        ServerProcess.start(args, ready_timeout_s=120) as cluster,
        client_for(cluster.url) as client,
    ):
        doomed, survivor = cluster.ready["workers"]
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.choices[0].finish_reason in ("length", "stop")
        os.kill(cluster.ready["worker_pids"][0], signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while True:  # wait until the dead worker's port refuses connections
            try:
                httpx2.get(f"{doomed}/health", timeout=1)
            except httpx2.TransportError:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{doomed} still answers after SIGKILL")
        for _ in range(6):
            raw = client.completions.with_raw_response.create(
                model="tiny", prompt="still here?", max_tokens=2
            )
            assert raw.headers[WORKER_HEADER] == survivor
        health = httpx2.get(f"{cluster.url}/health", timeout=10).json()
        assert [w["breaker"] for w in health["workers"]] == ["open", "closed"]
        assert metric(cluster.url, "kvstack_router_breaker_state", worker=doomed) == 2
        retries = metric(cluster.url, "kvstack_router_retries_total", worker=doomed)
        # each failure that opened it was retried on the survivor: two, or one if the startup
        # health probe happened to run after the kill and counted the other
        assert 1 <= retries <= 2
        for _ in range(3):  # once open, the dead worker is not even tried
            client.completions.create(model="tiny", prompt="and now?", max_tokens=2)
        assert metric(cluster.url, "kvstack_router_retries_total", worker=doomed) == retries
    assert cluster.proc.returncode == 0
    with pytest.raises(httpx2.TransportError):  # the survivor went down with the cluster
        httpx2.get(f"{survivor}/health", timeout=10)


@pytest.mark.parametrize("faulty", ["silent"], indirect=True)
def test_a_failure_before_the_first_byte_is_retried_elsewhere(
    faulty: FaultyWorker, workers: list[str]
) -> None:
    good = workers[0]
    with RouterThread([faulty.url, good], policy="round_robin") as router:
        raw = httpx2.post(
            f"{router.url}/v1/completions",
            json={"model": "tiny", "prompt": "retry me", "max_tokens": 2},
            headers={TRACE_HEADER: "trace-retry"},
            timeout=60,
        )
        assert raw.status_code == 200
        assert raw.headers[WORKER_HEADER] == good
        assert raw.headers[TRACE_HEADER] == "trace-retry"
        assert len(faulty.posts) == 1
        assert faulty.posts[0][TRACE_HEADER] == "trace-retry"  # the worker got the trace id
        assert metric(router.url, "kvstack_router_retries_total", worker=faulty.url) == 1


def read_stream(client: openai.OpenAI, texts: list[str]) -> None:
    stream = client.completions.create(model="tiny", prompt="stream me", max_tokens=20, stream=True)
    for chunk in stream:
        texts.append(chunk.choices[0].text)


@pytest.mark.parametrize("faulty", ["mid_stream"], indirect=True)
def test_a_worker_dying_mid_stream_is_an_error_never_a_retry(
    faulty: FaultyWorker, workers: list[str]
) -> None:
    good = workers[0]
    with RouterThread([faulty.url, good], policy="round_robin") as router:
        texts: list[str] = []
        with client_for(router.url) as client, pytest.raises((openai.APIError, httpx2.HTTPError)):
            read_stream(client, texts)
        assert texts == ["Hi"]  # the first event got through; then the error, never [DONE]
        assert len(faulty.posts) == 1
        assert metric(router.url, "kvstack_router_retries_total", worker=faulty.url) == 0
        assert metric(router.url, "kvstack_router_requests_total", worker=good, status="200") == 0
        aborted = metric(
            router.url, "kvstack_router_requests_total", worker=faulty.url, status="aborted"
        )
        assert aborted == 1


@pytest.mark.parametrize("faulty", ["short_body"], indirect=True)
def test_a_body_cut_short_is_an_error_not_a_success(faulty: FaultyWorker) -> None:
    with RouterThread([faulty.url]) as router, client_for(router.url) as client:
        with pytest.raises(openai.APIError):
            client.completions.create(model="tiny", prompt="cut me", max_tokens=2)
        assert len(faulty.posts) == 1


@pytest.mark.parametrize("faulty", ["trickle", "one_write"], indirect=True)
def test_a_chunked_answer_is_relayed_whole_on_fresh_connections(
    faulty: FaultyWorker,
) -> None:
    with RouterThread([faulty.url]) as router:
        for i in range(3):  # each answer says connection: close; the next needs a new one
            response = httpx2.post(
                f"{router.url}/v1/completions",
                json={"model": "tiny", "prompt": f"big {i}", "max_tokens": 2},
                timeout=WAIT_S,
            )
            assert response.status_code == 200
            assert response.content == CHUNKED_ANSWERS[faulty.mode][0]
            assert response.headers["content-type"] == "application/json"
            assert "x-kvstack-extra" not in response.headers  # only the listed headers relay
        assert len(faulty.posts) == 3
        assert metric(router.url, "kvstack_router_upstream_failures_total", worker=faulty.url) == 0


@pytest.mark.parametrize("faulty", ["hang"], indirect=True)
def test_a_request_past_its_deadline_gets_504(faulty: FaultyWorker) -> None:
    with RouterThread([faulty.url], request_timeout_s=0.5) as router:
        response = httpx2.post(
            f"{router.url}/v1/completions",
            json={"model": "tiny", "prompt": "wait", "max_tokens": 2},
            timeout=WAIT_S,
        )
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"


def test_no_worker_available_is_503() -> None:
    with socket.socket() as s:  # a port with nothing listening: connections are refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    options = {"breaker_failure_threshold": 1, "breaker_cooldown_s": 600.0}
    with RouterThread([dead], health_check_interval_s=600.0, **options) as router:
        first = httpx2.post(f"{router.url}/v1/completions", json={}, timeout=60)
        # refused: 502 after the retries, unless the startup probe opened the breaker first
        assert first.status_code in (502, 503)
        response = httpx2.post(f"{router.url}/v1/completions", json={}, timeout=60)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_worker_available"
        assert httpx2.get(f"{router.url}/health", timeout=10).status_code == 503
