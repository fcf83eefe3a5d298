"""Engine API details: registration kinds, metrics, the async-free sync helpers, torch laziness."""

from __future__ import annotations

import importlib
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from kvstack.transfer import (
    Engine,
    EngineConfig,
    InvalidRequest,
    Op,
    RequestStatus,
    SegmentExists,
    SegmentNotFound,
    SegmentReadOnly,
    TransferRequest,
    TransportUnavailable,
)

TIMEOUT_S = 60.0


@pytest.fixture
def pair() -> Iterator[tuple[Engine, Engine]]:
    config = EngineConfig(metadata_url=f"memory://{uuid.uuid4().hex}", metrics_port=0)
    a, b = Engine(config), Engine(config)
    yield a, b
    a.close()
    b.close()


def test_register_kinds_and_local_transport(pair: tuple[Engine, Engine]) -> None:
    torch = importlib.import_module("torch")  # CPU tensors: the CPU build is enough
    a, b = pair
    a.register("bytes", bytearray(b"0123456789"))
    a.register("array", np.arange(16, dtype=np.float32))
    a.register("tensor", torch.arange(8, dtype=torch.int64))
    a.register("readonly", b"frozen bytes")
    local = b.allocate("local", 128)
    b.read("local", "bytes", 10)
    assert bytes(local[:10]) == b"0123456789"
    b.read("local", "array", 64)
    np.testing.assert_array_equal(local[:64].view(np.float32), np.arange(16, dtype=np.float32))
    b.read("local", "tensor", 64)
    np.testing.assert_array_equal(local[:64].view(np.int64), np.arange(8))
    with pytest.raises(SegmentReadOnly):
        b.write("local", "readonly", 4)
    out = torch.zeros(8, dtype=torch.int64)
    b.read_into_tensor(out, "tensor")
    assert out.tolist() == list(range(8))
    b.write_tensor(torch.full((2,), 7, dtype=torch.int64), "tensor", remote_offset=8)
    assert a.array("tensor")[8:24].view(np.int64).tolist() == [7, 7]


def test_registration_errors(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    a.allocate("taken", 16)
    with pytest.raises(SegmentExists, match="'taken'"):
        b.allocate("taken", 16)
    with pytest.raises(SegmentExists):
        a.register("taken", bytearray(4))
    with pytest.raises(InvalidRequest, match="not C-contiguous"):
        a.register("strided", np.zeros((4, 4))[:, 1])
    with pytest.raises(InvalidRequest, match="cannot register int"):
        a.register("number", 5)
    with pytest.raises(InvalidRequest, match="segment name"):
        a.allocate("", 4)
    with pytest.raises(SegmentNotFound):
        a.unregister("never-registered")


def test_forced_transport_that_cannot_reach(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    a.register("plain", bytearray(8))
    b.allocate("local", 8)
    with pytest.raises(TransportUnavailable, match="'plain'"):
        b.read("local", "plain", 8, transport="shm")  # plain bytes are not shared memory


def test_batch_api_poll_statuses_and_callbacks(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    a.allocate("remote", 1 << 20)
    b.allocate("local", 1 << 20)
    requests = [
        TransferRequest(Op.WRITE, "local", i * 4096, "remote", i * 4096, 4096) for i in range(8)
    ]
    seen: list[int] = []
    batch = b.submit(requests, transport="tcp")
    batch.add_done_callback(lambda done: seen.append(len(done)))
    batch.wait(timeout_s=TIMEOUT_S)
    assert batch.poll()
    assert batch.statuses() == [RequestStatus.DONE] * 8
    assert seen == [8]
    empty = b.submit([])
    assert empty.poll()
    assert empty.wait() == []


def test_metrics_are_exported(pair: tuple[Engine, Engine]) -> None:
    a, b = pair
    a.allocate("m-remote", 4096)
    b.allocate("m-local", 4096)
    b.write("m-local", "m-remote", 4096, transport="tcp")
    assert b.metrics_port is not None
    with urllib.request.urlopen(
        f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=TIMEOUT_S
    ) as r:
        text = r.read().decode()
    assert f'kvstack_transfer_bytes_total{{op="write",peer="{a.address}",transport="tcp"}}' in text
    assert "kvstack_transfer_batch_seconds_bucket" in text


def test_engine_never_imports_torch_for_host_memory() -> None:
    code = (
        "import sys, numpy as np, uuid\n"
        "from kvstack.transfer import Engine, EngineConfig\n"
        "url = 'memory://' + uuid.uuid4().hex\n"
        "config = EngineConfig(metadata_url=url)\n"
        "with Engine(config) as a, Engine(config) as b:\n"
        "    a.allocate('x', 64); b.allocate('y', 64)\n"
        "    b.read('y', 'x', 64, transport='shm'); b.read('y', 'x', 64, transport='tcp')\n"
        "    b.read_into_tensor(np.zeros(8), 'x', transport='tcp')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT_S)
