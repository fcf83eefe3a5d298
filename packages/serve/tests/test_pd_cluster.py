"""Prefill/decode disaggregation across real processes on 127.0.0.1: identity, failures, chaos.

Every worker is a ``kvstack-serve up`` child; KV pages move between them through
``kvstack.transfer`` shared memory, named by a real metadata service.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from typing import Any

import httpx2
import pytest
import torch

from kvstack.serve import ServerProcess

TINY = ["--model", "tiny", "--port", "0"]
WAIT_S = 30.0


def _complete(url: str, prompt: list[int], *, max_tokens: int = 8, **headers: str) -> Any:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx2.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def _health(url: str) -> dict[str, Any]:
    return httpx2.get(f"{url}/health", timeout=10).json()


def _wait_idle(url: str) -> dict[str, Any]:
    """Poll a worker until nothing runs, waits, transfers or is held and every block is free."""
    deadline = time.monotonic() + WAIT_S
    while True:
        state = _health(url)
        busy = (
            state["num_requests_running"],
            state["num_requests_waiting"],
            state["num_requests_transferring"],
            state["num_prefills_held"],
        )
        if busy == (0, 0, 0, 0) and state["kv_blocks_free"] == state["kv_blocks_total"]:
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not idle after {WAIT_S} s: {state}")
        time.sleep(0.05)


def _prompts(count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(32, 127, (24,), generator=gen).tolist()
    out = []
    for i in range(count):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        tail = torch.randint(32, 127, (n,), generator=gen).tolist()
        out.append(shared + tail if i % 2 else tail)  # half share a 24-token prefix
    return out


@pytest.fixture(scope="module")
def pd_cluster() -> Iterator[ServerProcess]:
    """Router + 1 prefill + 1 decode worker + the embedded store, started by ``up``."""
    args = [*TINY, "--prefill", "1", "--decode", "1", "--num-blocks", "128"]
    with ServerProcess.start([*args, "--store-memory", "64MiB"], ready_timeout_s=180) as cluster:
        yield cluster


def test_greedy_outputs_identical_across_colocated_pd_prefix_hit_and_store_paths(
    pd_cluster: ServerProcess, tiny_server: ServerProcess
) -> None:
    prompts = _prompts(50, seed=7)
    colocated = [_complete(tiny_server.url, p).json()["choices"][0]["text"] for p in prompts]
    pd_first = [_complete(pd_cluster.url, p) for p in prompts]
    pd_again = [_complete(pd_cluster.url, p) for p in prompts]  # prefix hits on the prefill side
    for response in (*pd_first, *pd_again):
        assert response.status_code == 200, response.text
        assert "x-kvstack-timings" in response.headers
    assert [r.json()["choices"][0]["text"] for r in pd_first] == colocated
    assert [r.json()["choices"][0]["text"] for r in pd_again] == colocated
    hits = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in pd_again]
    assert sum(hits) > 0
    # A fresh colocated instance on the same store reads the blocks the PD prefill wrote.
    store = pd_cluster.ready["store"]
    with ServerProcess.start([*TINY, "--store", store], ready_timeout_s=120) as fresh:
        answers = [_complete(fresh.url, p).json() for p in prompts]
        assert [a["choices"][0]["text"] for a in answers] == colocated
        from_store = [a["usage"]["prompt_tokens_details"]["store_cached_tokens"] for a in answers]
        assert sum(from_store) >= 16 * 25  # at least the shared prefix's full block, each
        metrics = httpx2.get(f"{fresh.url}/metrics", timeout=10).text
        assert re.search(
            r'kvstack_serve_cached_tokens_total\{model="tiny",tier="store"\} [1-9]', metrics
        )
    for url in pd_cluster.ready["workers"]:
        _wait_idle(url)
    router_metrics = httpx2.get(f"{pd_cluster.url}/metrics", timeout=10).text
    for phase in ("alloc_wait", "handshake", "prefill", "kv_transfer", "first_token", "decode"):
        assert f'kvstack_router_phase_seconds_count{{phase="{phase}"}} 100.0' in router_metrics


def test_layout_mismatch_is_refused_before_any_byte_moves(pd_cluster: ServerProcess) -> None:
    [prefill_url] = pd_cluster.ready["prefill"]
    layout = {
        "fingerprint": "x",
        "block_size": 16,
        "dtype": "float32",
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
        "block_nbytes": 1,
    }
    body = {
        "request_id": "mismatch",
        "prompt_token_ids": [1, 2, 3],
        "layout": layout,
        "segment": "nowhere",
        "block_ids": [0],
        "deadline_s": 5,
    }
    response = httpx2.post(f"{prefill_url}/kv/prefill", json=body, timeout=10)
    assert response.status_code == 409
    assert "KV layout mismatch in fingerprint" in response.json()["error"]["message"]
    _wait_idle(prefill_url)


def test_dead_decoder_segment_makes_prefill_release_everything(pd_cluster: ServerProcess) -> None:
    [prefill_url] = pd_cluster.ready["prefill"]
    [decode_url] = pd_cluster.ready["decode"]
    # The real layout, read from a working handoff's peer: a decoder whose segment is gone.
    layout = _layout_of(decode_url, prefill_url)
    body = {
        "request_id": "dead-decoder",
        "prompt_token_ids": list(range(40, 80)),
        "layout": layout,
        "segment": "kvstack-serve-kv-gone",
        "block_ids": [0, 1, 2],
        "deadline_s": 5,
    }
    response = httpx2.post(f"{prefill_url}/kv/prefill", json=body, timeout=10)
    assert response.status_code == 502
    assert "KV push failed" in response.json()["error"]["message"]
    _wait_idle(prefill_url)


def _layout_of(decode_url: str, prefill_url: str) -> dict[str, Any]:
    # Ask the prefill worker with a deliberately wrong fingerprint: its error names its own.
    probe = {
        "fingerprint": "?",
        "block_size": 16,
        "dtype": "float32",
        "num_layers": 0,
        "num_kv_heads": 0,
        "head_dim": 0,
        "block_nbytes": 0,
    }
    body = {"request_id": f"probe-{time.monotonic_ns()}", "layout": probe, "deadline_s": 1}
    message = httpx2.post(f"{prefill_url}/kv/prefill", json=body, timeout=10).json()["error"]
    match = re.search(r"this worker has '([0-9a-f]+)'", message["message"])
    assert match, message
    info = httpx2.get(f"{decode_url}/v1/models", timeout=10).json()["data"][0]
    assert info["mode"] == "decode"
    from kvstack.serve import load_tiny  # noqa: PLC0415
    from kvstack.serve._attention import PagedKVCache  # noqa: PLC0415

    config = load_tiny().model.config
    nbytes = PagedKVCache.bytes_per_block(
        num_layers=config.num_layers,
        block_size=16,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
    )
    return {
        "fingerprint": match.group(1),
        "block_size": 16,
        "dtype": "float32",
        "num_layers": config.num_layers,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "block_nbytes": nbytes,
    }


# ---- a cluster whose workers the test kills and restarts ---------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Cluster:
    """A metadata service, prefill and decode workers on fixed ports, and a router."""

    def __init__(self, stack: ExitStack, *, prefill: int, decode: int) -> None:
        self.stack = stack
        meta = subprocess.Popen(
            [sys.executable, "-m", "kvstack.transfer", "metadata", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        stack.callback(meta.kill)
        line = meta.stdout.readline() if meta.stdout else ""
        found = re.search(r"http://\S+", line)
        assert found, line
        self.metadata = found.group(0)
        self.ports = {"prefill": [_free_port() for _ in range(prefill)]}
        self.ports["decode"] = [_free_port() for _ in range(decode)]
        self.workers: dict[int, ServerProcess] = {}
        for mode, ports in self.ports.items():
            for port in ports:
                self.start(mode, port)
        urls = {m: [f"http://127.0.0.1:{p}" for p in ps] for m, ps in self.ports.items()}
        self.urls = urls
        argv = ["--port", "0", "--health-check-interval", "0.5", "--breaker-cooldown", "1"]
        for url in urls["prefill"]:
            argv += ["--prefill-worker", url]
        for url in urls["decode"]:
            argv += ["--decode-worker", url]
        self.router = stack.enter_context(ServerProcess.start(argv, command="router"))

    def start(self, mode: str, port: int) -> None:
        args = [
            *TINY[:2],
            "--port",
            str(port),
            "--mode",
            mode,
            "--transfer-metadata",
            self.metadata,
            "--num-blocks",
            "96",
            "--handoff-timeout",
            "10",
        ]
        self.workers[port] = self.stack.enter_context(
            ServerProcess.start(args, ready_timeout_s=120)
        )

    def kill(self, port: int) -> None:
        self.workers[port].proc.kill()
        self.workers[port].proc.wait(timeout=10)


def test_prefill_killed_mid_handoff_fails_fast_frees_blocks_and_router_retries() -> None:
    with ExitStack() as stack:
        cluster = _Cluster(stack, prefill=2, decode=1)
        [decode_url] = cluster.urls["decode"]
        victim_port = cluster.ports["prefill"][0]
        victim = cluster.workers[victim_port]
        os.kill(victim.proc.pid, signal.SIGSTOP)  # mid-handoff: it has the request, no answer
        result: dict[str, Any] = {}

        def call() -> None:
            result["response"] = _complete(
                decode_url,
                list(range(50, 90)),
                **{"x-kvstack-prefill": f"http://127.0.0.1:{victim_port}"},
            )
            result["at"] = time.monotonic()

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        while _health(decode_url)["num_requests_transferring"] == 0:
            assert time.monotonic() < deadline, "the decode worker never reserved blocks"
            time.sleep(0.02)
        time.sleep(0.2)
        killed = time.monotonic()
        cluster.kill(victim_port)
        caller.join(10)
        response = result["response"]
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "kv_handoff_failed"
        assert result["at"] - killed < 1.0
        _wait_idle(decode_url)
        # Through the router: the dead prefill worker is skipped or retried around.
        for prompt in _prompts(10, seed=3):
            response = _complete(cluster.router.url, prompt)
            assert response.status_code == 200, response.text
        _wait_idle(decode_url)
        _wait_idle(cluster.urls["prefill"][1])


def test_decode_killed_mid_handoff_makes_prefill_release_everything() -> None:
    with ExitStack() as stack:
        cluster = _Cluster(stack, prefill=1, decode=2)
        [prefill_url] = cluster.urls["prefill"]
        prefill_pid = cluster.workers[cluster.ports["prefill"][0]].proc.pid
        doomed = cluster.ports["decode"][0]
        os.kill(prefill_pid, signal.SIGSTOP)  # the handshake waits in its socket
        caller = threading.Thread(
            target=_ignore_errors,
            args=(f"http://127.0.0.1:{doomed}", prefill_url),
            daemon=True,
        )
        caller.start()
        deadline = time.monotonic() + 10
        while _health(f"http://127.0.0.1:{doomed}")["num_requests_transferring"] == 0:
            assert time.monotonic() < deadline, "the decode worker never reserved blocks"
            time.sleep(0.02)
        cluster.kill(doomed)  # the decoder dies while its handshake is pending
        os.kill(prefill_pid, signal.SIGCONT)
        caller.join(10)
        _wait_idle(prefill_url)  # it prefilled, failed to push or pushed into the void, released
        for prompt in _prompts(6, seed=4):
            assert _complete(cluster.router.url, prompt).status_code == 200
        _wait_idle(prefill_url)
        _wait_idle(cluster.urls["decode"][1])


def _ignore_errors(decode_url: str, prefill_url: str) -> None:
    # The decoder is killed under this call: a connection error is the expected end.
    with suppress(httpx2.HTTPError):
        _complete(decode_url, list(range(60, 100)), **{"x-kvstack-prefill": prefill_url})


def test_a_thousand_random_aborts_and_kills_leak_no_block() -> None:
    rng = random.Random(1234)
    prompts = _prompts(64, seed=5)
    with ExitStack() as stack:
        cluster = _Cluster(stack, prefill=2, decode=2)
        outcomes = {"ok": 0, "aborted": 0, "failed": 0}

        async def one(client: httpx2.AsyncClient, index: int) -> None:
            prompt = prompts[index % len(prompts)]
            body = {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": rng.randint(1, 12),
                "temperature": 0,
                "ignore_eos": True,
                "stream": rng.random() < 0.5,
            }
            abort_after = rng.random() * 0.08 if rng.random() < 0.5 else None
            request = client.post(f"{cluster.router.url}/v1/completions", json=body)
            try:
                if abort_after is None:
                    response = await request
                    outcomes["ok" if response.status_code == 200 else "failed"] += 1
                else:
                    await asyncio.wait_for(request, abort_after)
                    outcomes["ok"] += 1
            except TimeoutError:
                outcomes["aborted"] += 1  # the client went away mid-request
            except httpx2.HTTPError:
                outcomes["failed"] += 1

        async def run() -> None:
            async with httpx2.AsyncClient(timeout=60) as client:
                for wave in range(10):
                    await asyncio.gather(*(one(client, wave * 100 + i) for i in range(100)))
                    if wave in (3, 6):  # kill a random worker and bring it back
                        mode = rng.choice(["prefill", "decode"])
                        port = rng.choice(cluster.ports[mode])
                        cluster.kill(port)
                        await asyncio.sleep(0.2)
                        cluster.start(mode, port)

        asyncio.run(run())
        assert sum(outcomes.values()) == 1000
        assert outcomes["ok"] > 300, outcomes
        for urls in cluster.urls.values():
            for url in urls:
                _wait_idle(url)


@pytest.mark.gpu
def test_pd_on_cuda_matches_colocated_and_reuses_the_store() -> None:
    # KV in GPU memory: the push goes over CUDA IPC, the store stages through host memory.
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    cuda = [*TINY, "--device", "cuda", "--attention-backend", "triton"]
    prompts = _prompts(20, seed=11)
    with ExitStack() as stack:
        colocated = stack.enter_context(ServerProcess.start(cuda, ready_timeout_s=300))
        want = [_complete(colocated.url, p).json()["choices"][0]["text"] for p in prompts]
        cluster = stack.enter_context(
            ServerProcess.start(
                [*cuda, "--prefill", "1", "--decode", "1", "--store-memory", "64MiB"],
                ready_timeout_s=300,
            )
        )
        answers = [_complete(cluster.url, p) for p in prompts]
        assert [a.json()["choices"][0]["text"] for a in answers] == want
        pushed = [json.loads(a.headers["x-kvstack-timings"])["transfer_bytes"] for a in answers]
        assert all(n > 0 for n in pushed)
        fresh = stack.enter_context(
            ServerProcess.start([*cuda, "--store", cluster.ready["store"]], ready_timeout_s=300)
        )
        again = [_complete(fresh.url, p).json() for p in prompts]
        assert [a["choices"][0]["text"] for a in again] == want
        assert sum(a["usage"]["prompt_tokens_details"]["store_cached_tokens"] for a in again) > 0
        for url in cluster.ready["workers"]:
            _wait_idle(url)
