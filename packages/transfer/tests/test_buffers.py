"""Engine.submit_buffers / transfer_buffers: one batch whose local side is caller memory."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kvstack.transfer import (
    AsyncEngine,
    BatchFailed,
    Engine,
    EngineConfig,
    InvalidRequest,
    Op,
    OutOfBounds,
    RequestStatus,
    SegmentNotFound,
    SegmentReadOnly,
)
from kvstack.transfer._peer import PeerProcess, random_bytes

TRANSPORTS = ["shm", "tcp"]
MiB = 1 << 20
SEG_BYTES = 8 * MiB
# (item lengths, first remote offset): one tiny batch (the one-off lane over tcp), scattered
# unaligned pages, and 1 MiB items large enough for shm's parallel copy (> 2 MiB in all).
BATCHES = [
    ([4096], 0),
    ([0, 1, 4095, 16 << 10, 3], 7),  # a 0-byte item must complete too
    ([MiB] * 5, 4096),
]
BATCH_IDS = ["one-4k", "scattered-unaligned", "5x1MiB"]


def _sha(data: bytes | bytearray | np.ndarray) -> str:
    return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


@pytest.fixture
def peer(start_peer: Callable[..., PeerProcess]) -> PeerProcess:
    return start_peer(f"seg:{SEG_BYTES}:shm:1", f"ro:{MiB}:readonly:2")


def _layout(lengths: list[int], first: int) -> list[int]:
    offsets, at = [], first
    for n in lengths:
        offsets.append(at)
        at += n + 13  # gaps between the ranges: nothing outside them may be touched
    return offsets


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("lengths", "first"), BATCHES, ids=BATCH_IDS)
def test_write_then_read_buffers_byte_for_byte(
    engine: Engine, peer: PeerProcess, *, transport: str, lengths: list[int], first: int
) -> None:
    seed = 3000 + len(lengths)  # the seed is in the test id through the batch
    offsets = _layout(lengths, first)
    # Every kind of buffer: bytes (WRITE only), bytearray, numpy arrays of other dtypes.
    sources: list[bytes | bytearray | np.ndarray] = []
    for i, n in enumerate(lengths):
        data = random_bytes(seed + i, n)
        sources.append(bytes(data) if i % 3 == 0 else bytearray(data) if i % 3 == 1 else data)
    engine.transfer_buffers(
        Op.WRITE,
        [(s, "seg", o) for s, o in zip(sources, offsets, strict=True)],
        transport=transport,
    )
    for source, offset, n in zip(sources, offsets, lengths, strict=True):
        assert peer.command(f"hash seg {offset} {n}") == _sha(source)

    for i, (offset, n) in enumerate(zip(offsets, lengths, strict=True)):
        peer.command(f"fill seg {offset} {n} {seed + 100 + i}")
    outs = [np.full(n, 0xAB, dtype=np.uint8) for n in lengths]
    batch = engine.submit_buffers(
        Op.READ,
        [(out, "seg", o) for out, o in zip(outs, offsets, strict=True)],
        transport=transport,
    )
    assert [o.status for o in batch.wait(timeout_s=60)] == [RequestStatus.DONE] * len(lengths)
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, random_bytes(seed + 100 + i, lengths[i]))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_partial_views_and_typed_arrays(engine: Engine, peer: PeerProcess, transport: str) -> None:
    values = np.arange(1000, dtype=np.float32)
    engine.transfer_buffers(Op.WRITE, [(values, "seg", 100)], transport=transport)
    out = np.zeros(2000, dtype=np.float32)
    # A slice moves only its own bytes: the rest of the array stays as it was.
    engine.transfer_buffers(Op.READ, [(out[500:1500], "seg", 100)], transport=transport)
    np.testing.assert_array_equal(out[500:1500], values)
    assert not out[:500].any()
    assert not out[1500:].any()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_remote_errors_fail_their_item_only(
    engine: Engine, peer: PeerProcess, transport: str
) -> None:
    good = np.zeros(4096, dtype=np.uint8)
    items = [
        (good, "seg", 0),
        (np.zeros(16, dtype=np.uint8), "seg", SEG_BYTES - 8),  # runs past the end
        (np.zeros(16, dtype=np.uint8), f"missing-{uuid.uuid4().hex}", 0),
        (good.copy(), "seg", 4096),
    ]
    batch = engine.submit_buffers(Op.READ, items, transport=transport)
    statuses = [o.status for o in batch.wait(timeout_s=60)]
    assert statuses == [
        RequestStatus.DONE,
        RequestStatus.FAILED,
        RequestStatus.FAILED,
        RequestStatus.DONE,
    ]
    failures = batch.failures()
    assert isinstance(failures[1], OutOfBounds)
    assert failures[1].segment == "seg"
    assert str(SEG_BYTES - 8) in str(failures[1])
    assert isinstance(failures[2], SegmentNotFound)
    with pytest.raises(BatchFailed) as info:
        engine.transfer_buffers(Op.WRITE, [(b"x" * 8, "ro", 0)])  # "ro" is not shareable
    assert isinstance(info.value.failures[0], SegmentReadOnly)


def test_bad_items_raise_naming_the_item(engine: Engine, peer: PeerProcess) -> None:
    buf = np.zeros(8, dtype=np.uint8)
    with pytest.raises(InvalidRequest, match="item 1 must be a"):
        engine.submit_buffers(Op.READ, [(buf, "seg", 0), (buf, "seg")])  # pyrefly: ignore[bad-argument-type] -- the bad input under test
    with pytest.raises(InvalidRequest, match="item 0: remote segment must be"):
        engine.submit_buffers(Op.READ, [(buf, 7, 0)])  # pyrefly: ignore[bad-argument-type] -- the bad input under test
    with pytest.raises(InvalidRequest, match=r"item 0: TransferRequest.remote_offset .* -1"):
        engine.submit_buffers(Op.READ, [(buf, "seg", -1)])
    with pytest.raises(InvalidRequest, match=r"'buffer 1'.*cannot register int"):
        engine.submit_buffers(Op.WRITE, [(buf, "seg", 0), (5, "seg", 0)])
    with pytest.raises(InvalidRequest, match=r"'buffer 0'.*not C-contiguous"):
        engine.submit_buffers(Op.READ, [(np.zeros((4, 4))[:, 1], "seg", 0)])
    with pytest.raises(SegmentReadOnly, match="'buffer 0'"):
        engine.submit_buffers(Op.READ, [(b"immutable", "seg", 0)])
    with pytest.raises(InvalidRequest, match="op must be"):
        engine.submit_buffers("read", [(buf, "seg", 0)])  # pyrefly: ignore[bad-argument-type] -- the bad input under test


def test_buffers_are_never_published(engine: Engine, peer: PeerProcess) -> None:
    before = {s.name for s in engine.segments()}
    engine.transfer_buffers(Op.READ, [(np.zeros(64, dtype=np.uint8), "seg", 0)])
    assert {s.name for s in engine.segments()} == before
    assert engine._served("buffer 0") is None
    assert engine._served("tensor") is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_threads_with_their_own_buffers(
    engine: Engine, peer: PeerProcess, transport: str
) -> None:
    # Each thread writes then reads back its own 64 KiB window, 20 times: no mixing.
    window = 64 << 10
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for round_ in range(20):
                data = random_bytes(t * 100 + round_, window)
                engine.transfer_buffers(
                    Op.WRITE,
                    [(data[:4096], "seg", t * window), (data[4096:], "seg", t * window + 4096)],
                    transport=transport,
                )
                out = np.empty(window, dtype=np.uint8)
                engine.transfer_buffers(Op.READ, [(out, "seg", t * window)], transport=transport)
                np.testing.assert_array_equal(out, data)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


@pytest.fixture
def local_pair() -> Iterator[tuple[Engine, Engine]]:
    config = EngineConfig(metadata_url=f"memory://{uuid.uuid4().hex}")
    a, b = Engine(config), Engine(config)
    yield a, b
    a.close()
    b.close()


def test_local_transport_and_async(local_pair: tuple[Engine, Engine]) -> None:
    a, b = local_pair
    seg = a.allocate("seg", 1 << 16)
    b.transfer_buffers(Op.WRITE, [(b"hello", "seg", 10), (bytearray(b"world"), "seg", 20)])
    assert bytes(seg[10:15]) == b"hello"
    assert bytes(seg[20:25]) == b"world"

    async def main() -> bytes:
        async with AsyncEngine(EngineConfig(metadata_url=a.config.metadata_url)) as c:
            out = bytearray(5)
            await c.transfer_buffers(Op.READ, [(out, "seg", 20)])
            batch = await c.submit_buffers(Op.READ, [(np.zeros(4, np.uint8), "seg", 1 << 16)])
            outcomes = await c.wait(batch)
            assert isinstance(outcomes[0].error, OutOfBounds)
            return bytes(out)

    assert asyncio.run(main()) == b"world"
