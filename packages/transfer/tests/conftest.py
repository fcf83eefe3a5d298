"""Fixtures: real metadata servers, a real redis-server, real peer processes, all on 127.0.0.1."""

from __future__ import annotations

import selectors
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from kvstack.transfer import Engine, EngineConfig, _env, _native
from kvstack.transfer._peer import PeerProcess
from tools.testing.redis_server import redis_server

START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    # A reader thread would outlive a hung child; the CLI prints its line at once, so poll.
    stdout = proc.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise TimeoutError(f"no line from {proc.args} within {timeout_s} s")
    return stdout.readline()


@pytest.fixture(scope="session")
def metadata_url() -> Iterator[str]:
    """``kvstack-transfer metadata --port 0`` in its own process; yields its URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstack.transfer",
            "--log-level",
            "WARNING",
            "metadata",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, START_TIMEOUT_S)
        assert "listening on " in line, line
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free port, killed after the session."""
    with redis_server(timeout_s=START_TIMEOUT_S) as url:
        yield url


@pytest.fixture
def start_peer(metadata_url: str) -> Iterator[Callable[..., PeerProcess]]:
    """Start peer processes registered at the session's metadata server; closed after the test."""
    peers: list[PeerProcess] = []

    def start(*segments: str, token: str | None = None, ttl_s: float = 10.0) -> PeerProcess:
        peer = PeerProcess(metadata_url, segments, token=token, ttl_s=ttl_s)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()


@pytest.fixture
def engine(metadata_url: str) -> Iterator[Engine]:
    # Small stripes so that megabyte transfers exercise striping across connections.
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_stripe_bytes=64 << 10)) as e:
        yield e


@pytest.fixture(params=["native", "python"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Host copies and tcp page frames through the native library (_copy.c) or the pure-Python
    fallback (KVSTACK_TRANSFER_NATIVE_COPY=0), in this process and in peers started after it:
    request it before ``peer``.
    """
    path: str = request.param
    monkeypatch.setenv(_env.NATIVE_COPY_VAR, "1" if path == "native" else "0")
    _native.forget()
    if path == "native" and _native.load() is None:
        compilers = [cc for cc in _env.compilers() if shutil.which(cc.split()[0])]
        if not compilers:
            pytest.skip(f"no C compiler ({', '.join(_env.compilers())}) to build the native path")
        try:  # a compiler is there, so the build must work: say why it did not
            _native.build(cache_dir=_env.cache_dir(), compiler=compilers[0])
        except _native.NativeUnavailable as exc:
            pytest.fail(f"the native library did not build: {exc}")
        pytest.fail("the native library built but load() returned None")
    yield path
    _native.forget()  # the next load() decides from the restored environment
