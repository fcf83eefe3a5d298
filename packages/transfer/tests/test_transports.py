"""One suite over every CPU transport, each real: a peer process, real sockets, real /dev/shm."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np
import pytest

from kvstack.transfer import (
    BatchFailed,
    Engine,
    Op,
    OutOfBounds,
    RequestStatus,
    SegmentNotFound,
    SegmentReadOnly,
    TransferRequest,
    _memory,
)
from kvstack.transfer._peer import PeerProcess, random_bytes

TRANSPORTS = ["shm", "tcp"]
MiB = 1 << 20
SEG_BYTES = 12 * MiB
# (length, remote offset, local offset): the size classes of the issue.
SIZE_CLASSES = [
    (0, 0, 0),  # nothing to move: must still complete
    (1, 0, 0),
    (1, SEG_BYTES - 1, 7),  # the very last byte
    (4095, 3, 5),  # unaligned both sides
    (4096, 4096, 8192),
    (MiB + 3, 12345, 1),  # several tcp stripes (the engine fixture stripes at 64 KiB), unaligned
    (9 * MiB + 1, 77, 333),  # big and odd
]
SIZE_IDS = [f"len{n}-r{r}-l{loc}" for n, r, loc in SIZE_CLASSES]
# Sparse shm: offsets past 2 GiB catch 32-bit offset arithmetic; pages appear only when touched.
SPARSE_BYTES = (2 << 30) + 4 * MiB


def _sha(data: np.ndarray) -> str:
    return hashlib.sha256(data.data).hexdigest()


@pytest.fixture
def peer(start_peer: Callable[..., PeerProcess]) -> PeerProcess:
    return start_peer(f"seg:{SEG_BYTES}:shm:1", f"ro:{MiB}:readonly:2")


def _local(engine: Engine, seed: int) -> np.ndarray:
    local = engine.allocate("local", SEG_BYTES)
    local[:] = random_bytes(seed, SEG_BYTES)
    return local


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("length", "remote_offset", "local_offset"), SIZE_CLASSES, ids=SIZE_IDS)
def test_write_then_read_byte_for_byte(
    engine: Engine,
    peer: PeerProcess,
    *,
    transport: str,
    length: int,
    remote_offset: int,
    local_offset: int,
) -> None:
    seed = 1000 + length  # the seed is in the test id through the length
    local = _local(engine, seed)
    engine.write(
        "local",
        "seg",
        length,
        local_offset=local_offset,
        remote_offset=remote_offset,
        transport=transport,
    )
    sent = local[local_offset : local_offset + length]
    assert peer.command(f"hash seg {remote_offset} {length}") == _sha(sent)

    peer.command(f"fill seg {remote_offset} {length} {seed + 1}")
    engine.read(
        "local",
        "seg",
        length,
        local_offset=local_offset,
        remote_offset=remote_offset,
        transport=transport,
    )
    expected = random_bytes(seed + 1, length)
    np.testing.assert_array_equal(local[local_offset : local_offset + length], expected)
    # Bytes around the target are untouched.
    before = random_bytes(seed, SEG_BYTES)
    np.testing.assert_array_equal(local[:local_offset], before[:local_offset])
    np.testing.assert_array_equal(local[local_offset + length :], before[local_offset + length :])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_offsets_past_2_gib_on_sparse_shm(
    engine: Engine, start_peer: Callable[..., PeerProcess], transport: str
) -> None:
    if os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize < 64 * MiB:
        pytest.skip("/dev/shm too small even for the touched pages")
    peer = start_peer(f"big:{SPARSE_BYTES}:shm")
    local = _local(engine, 7)
    offset = (2 << 30) + 12345
    engine.write(
        "local", "big", 3 * MiB + 5, remote_offset=offset, local_offset=9, transport=transport
    )
    assert peer.command(f"hash big {offset} {3 * MiB + 5}") == _sha(local[9 : 9 + 3 * MiB + 5])
    local[:] = 0
    engine.read(
        "local", "big", 3 * MiB + 5, remote_offset=offset, local_offset=9, transport=transport
    )
    np.testing.assert_array_equal(
        local[9 : 9 + 3 * MiB + 5], random_bytes(7, SEG_BYTES)[9 : 9 + 3 * MiB + 5]
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_scattered_batch_reports_every_request(
    copy_path: str, engine: Engine, peer: PeerProcess, transport: str
) -> None:
    local = _local(engine, 11)
    page = 16 << 10
    rng = np.random.default_rng(11)
    remote_pages = rng.choice(SEG_BYTES // page, 64, replace=False)
    local_pages = rng.choice(SEG_BYTES // page, 64, replace=False)
    requests = [
        TransferRequest(Op.WRITE, "local", int(lp) * page, "seg", int(rp) * page, page)
        for lp, rp in zip(local_pages, remote_pages, strict=True)
    ]
    batch = engine.submit(requests, transport=transport)
    outcomes = batch.wait(timeout_s=60)
    assert [o.status for o in outcomes] == [RequestStatus.DONE] * 64
    for lp, rp in zip(local_pages[:8], remote_pages[:8], strict=True):
        assert peer.command(f"hash seg {int(rp) * page} {page}") == _sha(
            local[int(lp) * page : int(lp + 1) * page]
        )
    # And back again, scattered into other local pages (vectored READs over tcp).
    back = engine.allocate("back", 64 * page)
    reads = [
        TransferRequest(Op.READ, "back", i * page, "seg", int(rp) * page, page)
        for i, rp in enumerate(remote_pages)
    ]
    batch = engine.submit(reads, transport=transport)
    assert all(o.ok for o in batch.wait(timeout_s=60))
    for i, lp in enumerate(local_pages):
        np.testing.assert_array_equal(
            back[i * page : (i + 1) * page], local[int(lp) * page : int(lp + 1) * page]
        )


@pytest.mark.parametrize("threads", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_page_batch_with_runs_byte_for_byte(
    copy_path: str,
    engine: Engine,
    peer: PeerProcess,
    *,
    transport: str,
    threads: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KV handoff whose pages form runs (merged into one copy on shm) and stray pages, some
    unaligned: every remote byte is checked after the WRITE, every local one after the READ.
    Over tcp, the frames' pages move natively or as one memoryview each (``copy_path``).
    """
    if threads:  # the shared copy path even on a 2-core box, in chunks of a few pages
        monkeypatch.setattr(_memory, "_NATIVE_THREADS", 3)
        monkeypatch.setattr(_memory, "_BYTES_PER_THREAD", 40 << 10)
        monkeypatch.setattr(_memory, "_RANGES_THREADS", 2)
        monkeypatch.setattr(_memory, "_COPY_THREADS", max(2, _memory._COPY_THREADS))
        monkeypatch.setattr(_memory, "PARALLEL_RANGES_BYTES", 1)
        monkeypatch.setattr(_memory, "_RANGES_MIN_AVERAGE_BYTES", 0)
        monkeypatch.setattr(_memory, "_RANGES_CHUNK_BYTES", 40 << 10)
    page = 16 << 10
    rng = np.random.default_rng(21)
    local = _local(engine, 21)
    remote = random_bytes(22, SEG_BYTES)
    peer.command(f"fill seg 0 {SEG_BYTES} 22")
    # 8 runs of 1..16 pages adjacent on both sides, each at a random page slot (so a run may
    # also continue the previous one on one side only); then 16 unaligned, odd-sized strays.
    slots = SEG_BYTES // page
    local_slots = rng.permutation(slots // 16)[:8] * 16
    remote_slots = rng.permutation(slots // 16)[:8] * 16
    ranges: list[tuple[int, int, int]] = []  # (local offset, remote offset, length)
    for ls, rs in zip(local_slots.tolist(), remote_slots.tolist(), strict=True):
        run = int(rng.integers(1, 16))
        ranges += [((ls + i) * page, (rs + i) * page, page) for i in range(run)]
    used_local = {o // page for o, _, _ in ranges}
    used_remote = {o // page for _, o, _ in ranges}
    free_local = [s for s in range(slots) if s not in used_local]
    free_remote = [s for s in range(slots) if s not in used_remote]
    for ls, rs in zip(
        rng.choice(free_local, 16, replace=False).tolist(),
        rng.choice(free_remote, 16, replace=False).tolist(),
        strict=True,
    ):
        ranges.append((ls * page + 3, rs * page + 5, page - int(rng.integers(5, 999))))
    merged = _memory.coalesce(
        *(np.array(column, dtype=np.int64) for column in zip(*ranges, strict=True))
    )
    assert len(merged[2]) < len(ranges) - 8  # the runs do merge
    requests = [TransferRequest(Op.WRITE, "local", lo, "seg", ro, n) for lo, ro, n in ranges]
    engine.transfer(requests, transport=transport)
    for lo, ro, n in ranges:
        remote[ro : ro + n] = local[lo : lo + n]
    assert peer.command(f"hash seg 0 {SEG_BYTES}") == _sha(remote)
    # And back: READ the same pages into a fresh copy of the local segment's pattern.
    peer.command(f"fill seg 0 {SEG_BYTES} 23")
    remote = random_bytes(23, SEG_BYTES)
    expected = local.copy()
    reads = [TransferRequest(Op.READ, "local", lo, "seg", ro, n) for lo, ro, n in ranges]
    engine.transfer(reads, transport=transport)
    for lo, ro, n in ranges:
        expected[lo : lo + n] = remote[ro : ro + n]
    np.testing.assert_array_equal(local, expected)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("op", [Op.READ, Op.WRITE])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(SEG_BYTES, 1), (SEG_BYTES - 10, 11), (2**63, 1)],
    ids=["at-end", "straddles", "huge"],
)
def test_out_of_bounds_refused_naming_segment_offset_length(
    engine: Engine, peer: PeerProcess, *, transport: str, op: Op, offset: int, length: int
) -> None:
    engine.allocate("local", 64)
    with pytest.raises(BatchFailed) as info:
        engine.transfer(
            [TransferRequest(op, "local", 0, "seg", offset, length)], transport=transport
        )
    error = info.value.failures[0]
    assert isinstance(error, OutOfBounds)
    assert (error.segment, error.offset, error.length) == ("seg", offset, length)
    assert f"at offset {offset} exceeds segment 'seg'" in str(error)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_local_out_of_bounds_refused(engine: Engine, peer: PeerProcess, transport: str) -> None:
    engine.allocate("local", 100)
    with pytest.raises(OutOfBounds, match="'local'"):
        engine.read("local", "seg", 101, transport=transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_segment_refused(engine: Engine, peer: PeerProcess, transport: str) -> None:
    engine.allocate("local", 64)
    with pytest.raises(SegmentNotFound, match="'no-such-segment'"):
        engine.read("local", "no-such-segment", 8, transport=transport)


def test_readonly_segment_refuses_writes_over_tcp(engine: Engine, peer: PeerProcess) -> None:
    local = engine.allocate("local", MiB)
    engine.read("local", "ro", MiB, transport="tcp")
    np.testing.assert_array_equal(local, random_bytes(2, MiB))
    with pytest.raises(SegmentReadOnly, match="'ro'"):
        engine.write("local", "ro", 16, transport="tcp")


def test_transport_is_chosen_automatically(engine: Engine, peer: PeerProcess) -> None:
    engine.allocate("local", 64)
    batch = engine.submit([TransferRequest(Op.READ, "local", 0, "seg", 0, 64)])
    batch.wait(timeout_s=60)
    work = batch._works[0]
    assert work is not None
    assert work.transport == "shm"  # same host, shareable: the fastest
    batch = engine.submit([TransferRequest(Op.READ, "local", 0, "ro", 0, 64)])
    batch.wait(timeout_s=60)
    work = batch._works[0]
    assert work is not None
    assert work.transport == "tcp"  # plain bytes cannot be mapped


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "bad_offset", [SEG_BYTES - 100, 2**62, 2**63], ids=["past-end", "2^62", "2^63"]
)
def test_one_bad_page_in_a_big_batch_is_named(
    engine: Engine, peer: PeerProcess, *, transport: str, bad_offset: int
) -> None:
    # 32 pages on one segment pair take the array path on shm; one bad page must still fail
    # alone, with its own error, while the 31 others land.
    local = _local(engine, 12)
    page = 4096
    requests = [
        TransferRequest(Op.WRITE, "local", i * page, "seg", i * page, page) for i in range(32)
    ]
    requests[17] = TransferRequest(Op.WRITE, "local", 0, "seg", bad_offset, page)
    batch = engine.submit(requests, transport=transport)
    batch.wait(timeout_s=60)
    failures = batch.failures()
    assert list(failures) == [17]
    assert isinstance(failures[17], OutOfBounds)
    assert failures[17].offset == bad_offset
    assert peer.command(f"hash seg {18 * page} {14 * page}") == _sha(local[18 * page : 32 * page])
