"""Every metadata backend, each real: in-process, the embedded HTTP server, a real redis-server."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from kvstack.transfer import (
    ConfigError,
    Engine,
    EngineConfig,
    MetadataBackend,
    MetadataError,
    SegmentExists,
    SegmentInfo,
    SegmentNotFound,
    open_metadata,
)
from kvstack.transfer._metadata_server import serve_in_thread

BACKENDS = ["memory", "http", "redis"]
DEADLINE_S = 30.0


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    return str(request.getfixturevalue("metadata_url" if request.param == "http" else "redis_url"))


@pytest.fixture
def backend(backend_url: str) -> Iterator[MetadataBackend]:
    md = open_metadata(backend_url, token=None, timeout_s=5.0)
    yield md
    md.close()


def _info(name: str, owner: str = "owner-a", size: int = 4096) -> SegmentInfo:
    return SegmentInfo(
        name=name,
        size_bytes=size,
        owner=owner,
        host_id="h",
        pid=1,
        tcp_address="127.0.0.1:1",
        shm_name=None,
    )


def _name() -> str:
    return f"seg-{uuid.uuid4().hex[:8]} with/odd?chars&"


def test_put_get_delete(backend: MetadataBackend) -> None:
    name = _name()
    info = _info(name)
    backend.put(info, ttl_s=30)
    assert backend.get(name) == info
    assert name in backend.names()
    backend.delete(name, owner="someone-else")  # not theirs: a no-op
    assert backend.get(name) == info
    backend.delete(name, owner="owner-a")
    with pytest.raises(SegmentNotFound, match="not found"):
        backend.get(name)
    assert name not in backend.names()


def test_another_owner_conflicts_unless_replacing(backend: MetadataBackend) -> None:
    name = _name()
    backend.put(_info(name, "owner-a"), ttl_s=30)
    backend.put(_info(name, "owner-a", size=8192), ttl_s=30)  # refresh by the owner
    with pytest.raises(SegmentExists, match="already registered"):
        backend.put(_info(name, "owner-b"), ttl_s=30)
    backend.put(_info(name, "owner-b"), ttl_s=30, replace=True)
    assert backend.get(name).owner == "owner-b"
    backend.delete(name, owner="owner-b")


def test_entries_expire_after_their_ttl(backend: MetadataBackend) -> None:
    name = _name()
    backend.put(_info(name), ttl_s=0.2)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            backend.get(name)
        except SegmentNotFound:
            break
        assert time.monotonic() < deadline, "entry never expired"
        time.sleep(0.05)  # polling an expiry with a deadline


def test_watch_returns_once_registered_and_times_out_otherwise(
    backend: MetadataBackend,
) -> None:
    name = _name()
    with pytest.raises(SegmentNotFound):
        backend.watch(name, timeout_s=0.05)
    registered = threading.Event()

    def register_later() -> None:
        registered.wait(DEADLINE_S)
        backend.put(_info(name), ttl_s=30)

    thread = threading.Thread(target=register_later)
    thread.start()
    registered.set()
    assert backend.watch(name, timeout_s=DEADLINE_S).name == name
    thread.join(DEADLINE_S)


def test_engines_transfer_through_every_backend(backend_url: str) -> None:
    config = EngineConfig(metadata_url=backend_url, transports=("tcp",))
    with Engine(config) as owner, Engine(config) as user:
        data = owner.allocate("md-seg", 1 << 16)
        data[:] = np.arange(1 << 16, dtype=np.uint8)
        local = user.allocate("md-local", 1 << 16)
        user.read("md-local", "md-seg", 1 << 16)
        np.testing.assert_array_equal(local, data)
        with pytest.raises(SegmentExists):
            user.allocate("md-seg", 10)
        assert user.wait_for("md-seg", timeout_s=DEADLINE_S).owner == owner.id


def test_unreachable_http_metadata_is_a_metadata_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    md = open_metadata(f"http://127.0.0.1:{port}", token=None, timeout_s=2.0)
    with pytest.raises(MetadataError, match=f"127.0.0.1:{port}"):
        md.get("x")
    md.close()


def test_http_metadata_token() -> None:
    url, stop = serve_in_thread(token="t0k")
    good = open_metadata(url, token="t0k", timeout_s=5.0)
    bad = open_metadata(url, token="nope", timeout_s=5.0)
    try:
        good.put(_info("guarded"), ttl_s=30)
        assert good.get("guarded").name == "guarded"
        with pytest.raises(MetadataError, match="token refused"):
            bad.get("guarded")
    finally:
        good.close()
        bad.close()
        stop()


@pytest.mark.parametrize("url", ["ftp://x:1", "localhost:7710", "http://nohostport"])
def test_bad_metadata_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="metadata"):
        open_metadata(url, token=None, timeout_s=1.0)
