"""Engine.submit_pages / transfer_pages: a page batch given as arrays, end to end."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kvstack.transfer import (
    AsyncEngine,
    BatchFailed,
    Engine,
    EngineConfig,
    InvalidRequest,
    Op,
    OutOfBounds,
    PeerUnavailable,
    RequestStatus,
    SegmentNotFound,
    SegmentReadOnly,
    TransferError,
    TransferRequest,
    TransferTimeout,
    TransportUnavailable,
    _tcp,
    _transport,
)
from kvstack.transfer._native import NativeCopier
from kvstack.transfer._peer import PeerProcess, random_bytes

TRANSPORTS = ["shm", "tcp"]
OPS = [Op.READ, Op.WRITE]
MiB = 1 << 20
SEG_BYTES = 4 * MiB
SLOT = 16 << 10
PEER_SEED = 41
# Far longer than anything here should take, short enough that a hang fails the test quickly.
WAIT_S = 60.0


def _sha(data: np.ndarray) -> str:
    return hashlib.sha256(data.tobytes()).hexdigest()


@pytest.fixture
def peer(start_peer: Callable[..., PeerProcess]) -> PeerProcess:
    return start_peer(f"kv:{SEG_BYTES}:shm:{PEER_SEED}", f"ro:{MiB}:readonly:2")


def _scattered(seed: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct random slots on each side, unaligned starts, lengths 0..SLOT-64 (0 and 1 too)."""
    rng = np.random.default_rng(seed)
    slots = SEG_BYTES // SLOT
    local = rng.choice(slots, count, replace=False) * SLOT + rng.integers(0, 64, count)
    remote = rng.choice(slots, count, replace=False) * SLOT + rng.integers(0, 64, count)
    lengths = rng.integers(0, SLOT - 64, count)
    lengths[:2] = [0, 1]
    return local, remote, lengths


def _expected(
    dst: np.ndarray, src: np.ndarray, dst_offsets: Any, src_offsets: Any, lengths: Any
) -> np.ndarray:
    out = dst.copy()
    for d, s, n in zip(dst_offsets, src_offsets, lengths, strict=True):
        out[d : d + n] = src[s : s + n]
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("op", OPS)
def test_pages_byte_for_byte(
    copy_path: str, engine: Engine, peer: PeerProcess, transport: str, op: Op
) -> None:
    seed = 500 + OPS.index(op)  # the op is in the test id
    local_offsets, remote_offsets, lengths = _scattered(seed, 200)
    local = engine.allocate("local", SEG_BYTES)
    local[:] = random_bytes(seed + 1, SEG_BYTES)
    before = local.copy()
    remote = random_bytes(PEER_SEED, SEG_BYTES)
    engine.transfer_pages(
        op,
        "local",
        "kv",
        local_offsets=local_offsets,
        remote_offsets=remote_offsets,
        lengths=lengths,
        transport=transport,
    )
    if op is Op.READ:
        expected = _expected(before, remote, local_offsets, remote_offsets, lengths)
        np.testing.assert_array_equal(local, expected)
    else:
        # One hash of the whole segment: the pages arrived and nothing else changed.
        expected = _expected(remote, before, remote_offsets, local_offsets, lengths)
        assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(expected)
        np.testing.assert_array_equal(local, before)


# Offset arrays the API converts once: narrower and unsigned dtypes, strided views, lists.
COLUMN_KINDS = ["int32", "uint64", "strided", "list"]


@pytest.mark.parametrize("kind", COLUMN_KINDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_other_integer_columns_are_accepted(
    engine: Engine, peer: PeerProcess, transport: str, kind: str
) -> None:
    local = engine.allocate("local", SEG_BYTES)
    slots = np.arange(0, 64, 2) * SLOT  # 32 pages
    columns: dict[str, Any] = {
        "int32": slots.astype(np.int32),
        "uint64": slots.astype(np.uint64),
        "strided": np.repeat(slots, 2)[::2],  # not contiguous
        "list": slots.tolist(),
    }
    offsets = columns[kind]
    if kind == "strided":
        assert not offsets.flags.c_contiguous
    engine.transfer_pages(
        Op.READ,
        "local",
        "kv",
        local_offsets=offsets,
        remote_offsets=offsets,
        lengths=SLOT,
        transport=transport,
    )
    expected = _expected(
        np.zeros(SEG_BYTES, np.uint8), random_bytes(PEER_SEED, SEG_BYTES), slots, slots, [SLOT] * 32
    )
    np.testing.assert_array_equal(local, expected)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_caller_may_reuse_its_arrays_at_once(
    engine: Engine, peer: PeerProcess, transport: str
) -> None:
    local = engine.allocate("local", SEG_BYTES)
    local[:] = random_bytes(7, SEG_BYTES)
    offsets = np.arange(64, dtype=np.int64) * SLOT
    batch = engine.submit_pages(
        Op.WRITE,
        "local",
        "kv",
        local_offsets=offsets,
        remote_offsets=offsets,
        lengths=SLOT,
        transport=transport,
    )
    offsets[:] = SEG_BYTES  # the batch copied them: in flight, its frames must not see this
    assert [o.status for o in batch.wait(timeout_s=WAIT_S)] == [RequestStatus.DONE] * 64
    expected = random_bytes(PEER_SEED, SEG_BYTES)
    expected[: 64 * SLOT] = local[: 64 * SLOT]
    assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(expected)


def _sample(name: str, transport: str, peer: PeerProcess) -> float:
    labels = {"transport": transport, "peer": peer.address, "op": "write"}
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("blocking", [False, True], ids=["submit", "transfer"])
def test_int64_columns_and_other_columns_give_the_same_batch(
    copy_path: str,
    engine: Engine,
    peer: PeerProcess,
    *,
    blocking: bool,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # int64 arrays take one native call (shm: checked and copied; tcp: checked and laid out
    # in frames) with the native library; int32 ones the general path. Same bytes, same
    # requests, metrics counted once either way.
    local = engine.allocate("local", SEG_BYTES)
    local_offsets, remote_offsets, lengths = _scattered(12, 100)
    total = int(lengths.sum())
    remote = random_bytes(PEER_SEED, SEG_BYTES)  # what the peer's segment holds
    requests = []
    native_calls: list[object] = []
    if transport == "shm":
        copy_page_columns = engine._shm.copy_page_columns

        def copy_spy(*args: Any, **kwargs: Any) -> int | None:
            copied = copy_page_columns(*args, **kwargs)
            native_calls.append(copied)
            return copied

        monkeypatch.setattr(engine._shm, "copy_page_columns", copy_spy)
    else:
        plan_pages = NativeCopier.plan_pages

        def plan_spy(self: NativeCopier, *args: Any, **kwargs: Any) -> Any:
            planned = plan_pages(self, *args, **kwargs)
            native_calls.append(planned if isinstance(planned, int) else planned[3])
            return planned

        monkeypatch.setattr(NativeCopier, "plan_pages", plan_spy)
    for round_, dtype in enumerate((np.int64, np.int32)):
        local[:] = random_bytes(11 + round_, SEG_BYTES)  # new bytes each round
        bytes_before = _sample("kvstack_transfer_bytes_total", transport, peer)
        requests_before = _sample("kvstack_transfer_requests_total", transport, peer)
        call: dict[str, Any] = {
            "local_offsets": local_offsets.astype(dtype),
            "remote_offsets": remote_offsets.astype(dtype),
            "lengths": lengths.astype(dtype),
            "transport": transport,
        }
        if blocking:
            engine.transfer_pages(Op.WRITE, "local", "kv", **call)
        else:
            batch = engine.submit_pages(Op.WRITE, "local", "kv", **call)
            if transport == "shm":
                assert batch.poll()  # shm batches finish inside submit
            statuses = [o.status for o in batch.wait(timeout_s=WAIT_S)]
            assert statuses == [RequestStatus.DONE] * 100
            assert len(batch) == 100
            requests.append(batch.requests)
        sent = _sample("kvstack_transfer_bytes_total", transport, peer) - bytes_before
        counted = _sample("kvstack_transfer_requests_total", transport, peer) - requests_before
        assert (sent, counted) == (total, 100)
        remote = _expected(remote, local, remote_offsets, local_offsets, lengths)
        assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(remote)
    # Only the int64 round went native, and only with the library there (without it, the
    # engine does not try).
    assert native_calls == ([total] if copy_path == "native" else [])
    if not blocking:
        assert requests[0] == requests[1]
        assert requests[0][7] == TransferRequest(
            Op.WRITE,
            "local",
            int(local_offsets[7]),
            "kv",
            int(remote_offsets[7]),
            int(lengths[7]),
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_batch_builds_requests_only_when_asked(
    engine: Engine, peer: PeerProcess, transport: str
) -> None:
    engine.allocate("local", SEG_BYTES)
    offsets = np.arange(16) * SLOT
    batch = engine.submit_pages(
        Op.READ,
        "local",
        "kv",
        local_offsets=offsets,
        remote_offsets=offsets[::-1],
        lengths=100,
        transport=transport,
        timeout_s=20,
    )
    assert batch.wait(timeout_s=WAIT_S)[3].ok
    assert batch._requests is not None  # wait() returns outcomes: now they exist
    again = engine.submit_pages(
        Op.READ,
        "local",
        "kv",
        local_offsets=offsets,
        remote_offsets=offsets,
        lengths=100,
        transport=transport,
    )
    again._wait(None)
    assert again._requests is None  # nobody asked
    assert batch.requests[3] == TransferRequest(
        Op.READ, "local", 3 * SLOT, "kv", 12 * SLOT, 100, 20
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_empty_arrays_give_a_finished_batch(
    engine: Engine, peer: PeerProcess, transport: str
) -> None:
    engine.allocate("local", SEG_BYTES)
    for empty in ([], np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)):
        batch = engine.submit_pages(
            Op.WRITE,
            "local",
            "kv",
            local_offsets=empty,
            remote_offsets=empty,
            lengths=empty,
            transport=transport,
        )
        assert len(batch) == 0
        assert batch.done
        assert batch.wait(timeout_s=WAIT_S) == []
        assert batch.failures() == {}
    engine.transfer_pages(
        Op.READ,
        "local",
        "kv",
        local_offsets=[],
        remote_offsets=[],
        lengths=SLOT,
        transport=transport,
    )


def test_pages_too_big_for_vectored_frames_and_other_transports(
    engine: Engine, peer: PeerProcess
) -> None:
    # Pages over TcpTransport.page_max_bytes go per request (striped), as submit sends them.
    local = engine.allocate("local", SEG_BYTES)
    offsets = np.array([0, 2 * MiB])
    engine.transfer_pages(
        Op.READ,
        "local",
        "kv",
        local_offsets=offsets,
        remote_offsets=offsets[::-1],
        lengths=MiB,
        transport="tcp",
    )
    remote = random_bytes(PEER_SEED, SEG_BYTES)
    np.testing.assert_array_equal(local[:MiB], remote[2 * MiB : 3 * MiB])
    np.testing.assert_array_equal(local[2 * MiB : 3 * MiB], remote[:MiB])
    # Engines of one process meet over the local transport, also per request.
    config = EngineConfig(metadata_url=f"memory://{uuid.uuid4().hex}")
    with Engine(config) as a, Engine(config) as b:
        seg = a.allocate("seg", 4096)
        b.register("src", bytearray(b"0123456789"))
        b.transfer_pages(
            Op.WRITE, "src", "seg", local_offsets=[0, 5], remote_offsets=[100, 200], lengths=5
        )
        assert bytes(seg[100:105]) == b"01234"
        assert bytes(seg[200:205]) == b"56789"


# Every input the call refuses up front: (changes to a good call, error class, message).
BAD_INPUTS = [
    pytest.param({"op": "read"}, InvalidRequest, "op must be Op.READ or Op.WRITE", id="op"),
    pytest.param(
        {"local_offsets": np.zeros(4)},
        InvalidRequest,
        "local_offsets must be integers within int64, got float64 values",
        id="float-dtype",
    ),
    pytest.param(
        {"remote_offsets": [True] * 4},
        InvalidRequest,
        "remote_offsets must be integers within int64, got bool values",
        id="bools",
    ),
    pytest.param(
        {"local_offsets": [0, 2**63, 0, 0]},
        InvalidRequest,
        "local_offsets must be integers within int64",  # numpy makes the list float64
        id="int-past-int64-in-list",
    ),
    pytest.param(
        {"local_offsets": np.array([0, 2**63, 0, 0], dtype=np.uint64)},
        InvalidRequest,
        "request 1: local_offsets is 9223372036854775808, past int64",
        id="uint64-past-int64",
    ),
    pytest.param(
        {"remote_offsets": np.zeros((2, 2), dtype=np.int64)},
        InvalidRequest,
        r"remote_offsets must be one-dimensional, got shape \(2, 2\)",
        id="2-d",
    ),
    pytest.param(
        {"local_offsets": 0},
        InvalidRequest,
        r"local_offsets must be one-dimensional, got shape \(\)",
        id="scalar-offsets",
    ),
    pytest.param(
        {"lengths": [1, 2, 3]},
        InvalidRequest,
        "one entry per request in each array, got local_offsets 4, remote_offsets 4, lengths 3",
        id="mismatched",
    ),
    pytest.param(
        {"remote_offsets": [0, 1, 2, -1]},
        InvalidRequest,
        "request 3: remote_offsets must be >= 0, got -1",
        id="negative-offset",
    ),
    pytest.param(
        {"lengths": -5}, InvalidRequest, "request 0: lengths must be >= 0, got -5", id="negative"
    ),
    pytest.param({"timeout_s": 0}, InvalidRequest, "timeout_s must be > 0", id="timeout"),
    pytest.param({"local": "nope"}, SegmentNotFound, "segment 'nope' not found", id="no-local"),
    pytest.param(
        {"remote": "missing-kv"}, SegmentNotFound, "segment 'missing-kv' not found", id="no-remote"
    ),
    pytest.param(
        {"remote": "ro"}, SegmentReadOnly, "segment 'ro' is read-only on peer", id="ro-remote"
    ),
    pytest.param(
        {"op": Op.READ, "local": "frozen"},
        SegmentReadOnly,
        "segment 'frozen' is read-only",
        id="ro-local",
    ),
    pytest.param(
        {"local_offsets": [0, 0, SEG_BYTES - 10, 0]},
        OutOfBounds,
        rf"^request 2: write of 4096 bytes at offset {SEG_BYTES - 10} exceeds segment 'local' "
        rf"\({SEG_BYTES} bytes\)$",
        id="local-out-of-bounds",
    ),
    pytest.param(
        {"remote_offsets": [0, SEG_BYTES, 0, SEG_BYTES + 1]},
        OutOfBounds,
        rf"^request 1: write of 4096 bytes at offset {SEG_BYTES} exceeds segment 'kv' "
        rf"\({SEG_BYTES} bytes\) on peer 127\.0\.0\.1:",
        id="remote-out-of-bounds",
    ),
    pytest.param(
        {"transport": "cuda"},
        TransportUnavailable,
        r"no transport of \['cuda'\] can reach",
        id="unreachable",
    ),
]


def _int64_arrays(call: dict[str, Any]) -> dict[str, Any]:
    """``call`` with its lists of int64 values as int64 arrays: the columns that take the
    native shm path, which checks and copies in one call and hands bad batches back."""

    def convert(value: Any) -> Any:
        if isinstance(value, list) and all(type(v) is int and -(2**63) <= v < 2**63 for v in value):
            return np.array(value, dtype=np.int64)
        return value

    return {name: convert(value) for name, value in call.items()}


@pytest.mark.parametrize("columns", ["lists", "int64-arrays"])
@pytest.mark.parametrize("blocking", [False, True], ids=["submit", "transfer"])
@pytest.mark.parametrize(("change", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise_typed_errors_before_any_byte_moves(
    engine: Engine,
    peer: PeerProcess,
    *,
    change: dict[str, Any],
    error: type[Exception],
    match: str,
    blocking: bool,
    columns: str,
) -> None:
    local = engine.allocate("local", SEG_BYTES)
    local[:] = 0xAB
    engine.register("frozen", bytes(SEG_BYTES), readonly=True)
    call: dict[str, Any] = {
        "op": Op.WRITE,
        "local": "local",
        "local_offsets": [0, SLOT, 2 * SLOT, 3 * SLOT],
        "remote": "kv",
        "remote_offsets": [0, SLOT, 2 * SLOT, 3 * SLOT],
        "lengths": 4096,
    } | change
    if columns == "int64-arrays":
        call = _int64_arrays(call)
    with pytest.raises(error, match=match):
        (engine.transfer_pages if blocking else engine.submit_pages)(**call)
    # Request 0 was good: it must not have moved either.
    assert peer.command(f"hash kv 0 {SLOT}") == _sha(random_bytes(PEER_SEED, SLOT))


def test_repeated_shm_batches_take_the_remembered_route_until_it_is_stale(
    engine: Engine, start_peer: Callable[..., PeerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second and later transfer_pages between two segments over shm skip the route's
    # lookups (Engine._page_routes). A re-allocated local segment, a bad request and a
    # restarted owner each go the usual way, with its errors, and the bytes stay right.
    routed: list[int] = []
    copy = _transport.PageRoute.copy

    def spy(self: _transport.PageRoute, *columns: Any) -> int:
        copied = copy(self, *columns)
        routed.append(max(copied, -1))
        return copied

    monkeypatch.setattr(_transport.PageRoute, "copy", spy)
    first = start_peer(f"kv-routed:{SEG_BYTES}:shm:{PEER_SEED}")
    local = engine.allocate("local", SEG_BYTES)
    offsets = np.arange(64, dtype=np.int64) * SLOT
    call = {"local_offsets": offsets, "remote_offsets": offsets[::-1].copy(), "lengths": SLOT}
    remote = random_bytes(PEER_SEED, SEG_BYTES)
    for round_ in range(3):
        local[:] = random_bytes(80 + round_, SEG_BYTES)
        engine.transfer_pages(Op.WRITE, "local", "kv-routed", transport="shm", **call)
        remote = _expected(remote, local, offsets[::-1], offsets, [SLOT] * 64)
        assert first.command(f"hash kv-routed 0 {SEG_BYTES}") == _sha(remote)
    assert routed == [64 * SLOT] * 2  # the first batch found the route, the next two took it
    engine.unregister("local")
    local = engine.allocate("local", SEG_BYTES)  # another mapping under the same name
    local[:] = random_bytes(90, SEG_BYTES)
    engine.transfer_pages(Op.WRITE, "local", "kv-routed", transport="shm", **call)
    remote = _expected(remote, local, offsets[::-1], offsets, [SLOT] * 64)
    assert first.command(f"hash kv-routed 0 {SEG_BYTES}") == _sha(remote)
    assert len(routed) == 2  # the stale route was dropped unused
    with pytest.raises(OutOfBounds) as bad:
        engine.transfer_pages(
            Op.WRITE, "local", "kv-routed", local_offsets=offsets,
            remote_offsets=offsets + (SEG_BYTES - 32 * SLOT), lengths=SLOT, transport="shm",
        )  # fmt: skip
    assert bad.value.index == 32
    first.kill()
    with pytest.raises(BatchFailed, match="has exited") as gone:
        engine.transfer_pages(Op.WRITE, "local", "kv-routed", transport="shm", **call)
    assert all(isinstance(e, PeerUnavailable) for e in gone.value.failures.values())
    second = start_peer(f"kv-routed:{SEG_BYTES}:shm:{PEER_SEED + 1}")
    fresh = random_bytes(PEER_SEED + 1, SEG_BYTES)
    for _ in range(2):
        engine.transfer_pages(Op.WRITE, "local", "kv-routed", transport="shm", **call)
    fresh = _expected(fresh, local, offsets[::-1], offsets, [SLOT] * 64)
    assert second.command(f"hash kv-routed 0 {SEG_BYTES}") == _sha(fresh)
    assert routed[-1] == 64 * SLOT  # the new owner's route, remembered and taken


def test_repeated_tcp_write_batches_take_the_remembered_route_until_it_is_stale(
    metadata_url: str, start_peer: Callable[..., PeerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A waited tcp page WRITE between two segments is remembered too: later batches skip the
    # lookups (Engine._fast_pages) and go straight to the wire. A killed owner fails its
    # batch by name and drops the route; its successor gets a fresh one.
    looked_up: list[int] = []
    fast_pages = Engine._fast_pages

    def spy(self: Engine, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(1)
        return fast_pages(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_fast_pages", spy)
    first = start_peer(f"kv-tcp:{SEG_BYTES}:shm:{PEER_SEED}")
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine:
        local = engine.allocate("local", SEG_BYTES)
        offsets = np.arange(128, dtype=np.int64) * SLOT
        call = {"local_offsets": offsets, "remote_offsets": offsets[::-1].copy(), "lengths": SLOT}
        remote = random_bytes(PEER_SEED, SEG_BYTES)
        for round_ in range(3):
            local[:] = random_bytes(60 + round_, SEG_BYTES)
            engine.transfer_pages(Op.WRITE, "local", "kv-tcp", transport="tcp", **call)
            remote = _expected(remote, local, offsets[::-1], offsets, [SLOT] * 128)
            assert first.command(f"hash kv-tcp 0 {SEG_BYTES}") == _sha(remote)
        assert len(looked_up) == 1  # the first batch found the route, the next two took it
        first.kill()
        with pytest.raises(BatchFailed) as gone:
            engine.transfer_pages(Op.WRITE, "local", "kv-tcp", transport="tcp", **call)
        assert set(gone.value.failures) == set(range(128))
        assert all(isinstance(e, PeerUnavailable) for e in gone.value.failures.values())
        second = start_peer(f"kv-tcp:{SEG_BYTES}:shm:{PEER_SEED + 1}")
        fresh = random_bytes(PEER_SEED + 1, SEG_BYTES)
        for _ in range(2):
            engine.transfer_pages(Op.WRITE, "local", "kv-tcp", transport="tcp", **call)
        fresh = _expected(fresh, local, offsets[::-1], offsets, [SLOT] * 128)
        assert second.command(f"hash kv-tcp 0 {SEG_BYTES}") == _sha(fresh)
        assert len(looked_up) == 2  # looked up afresh once, then the new route taken


def test_out_of_bounds_keeps_index_and_fields(engine: Engine, peer: PeerProcess) -> None:
    engine.allocate("local", SEG_BYTES)
    with pytest.raises(OutOfBounds) as info:
        engine.submit_pages(
            Op.READ,
            "local",
            "kv",
            local_offsets=[0, 0, 0],
            remote_offsets=[0, 8, SEG_BYTES - 8],
            lengths=[8, 8, 16],
            transport="tcp",
        )
    error = info.value
    assert (error.index, error.segment, error.offset, error.length) == (2, "kv", SEG_BYTES - 8, 16)
    assert error.size_bytes == SEG_BYTES
    assert error.op == "read"
    assert error.peer == peer.address


@pytest.mark.parametrize("per_connection", [512 << 10, 4 * MiB], ids=["4-connections", "1"])
@pytest.mark.parametrize("blocking", [False, True], ids=["submit", "transfer"])
def test_big_tcp_write_batches_go_out_at_once(
    copy_path: str,
    metadata_url: str,
    peer: PeerProcess,
    *,
    monkeypatch: pytest.MonkeyPatch,
    per_connection: int,
    blocking: bool,
) -> None:
    # A WRITE page batch of >= 1 MiB sends one frame per connection, all at once from the
    # native copier's threads (or from pool threads without it); the peer gets every byte.
    # transfer_pages lays the frames out in the same native call (send_pages).
    monkeypatch.setattr(_tcp, "_PAGE_BYTES_PER_CONN", per_connection)
    sends: list[int] = []
    send_parallel, send_pages = NativeCopier.send_parallel, NativeCopier.send_pages

    def spy(self: NativeCopier, units: np.ndarray, **kwargs: Any) -> None:
        send_parallel(self, units, **kwargs)
        sends.append(len(units))
        assert not units[:, 6].any()  # every unit sent

    def spy_pages(
        self: NativeCopier, *args: Any, conns: list[tuple[int, int]], **kwargs: Any
    ) -> tuple[int, list[int]]:
        total, statuses = send_pages(self, *args, conns=conns, **kwargs)
        sends.append(len(conns))
        assert statuses == [0] * len(conns)  # every frame sent
        return total, statuses

    monkeypatch.setattr(NativeCopier, "send_parallel", spy)
    monkeypatch.setattr(NativeCopier, "send_pages", spy_pages)
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine:
        local = engine.allocate("local", SEG_BYTES)
        remote = random_bytes(PEER_SEED, SEG_BYTES)
        rng = np.random.default_rng(36)
        for round_ in range(3):
            local[:] = random_bytes(50 + round_, SEG_BYTES)
            slots = rng.choice(SEG_BYTES // SLOT, 128, replace=False)
            offsets = slots * SLOT
            call = {
                "local_offsets": offsets[::-1].copy(), "remote_offsets": offsets,
                "lengths": SLOT, "transport": "tcp",
            }  # fmt: skip
            if blocking:
                engine.transfer_pages(Op.WRITE, "local", "kv", **call)
            else:
                engine.submit_pages(Op.WRITE, "local", "kv", **call).wait(timeout_s=WAIT_S)
            remote = _expected(remote, local, offsets, offsets[::-1], [SLOT] * 128)
            assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(remote)
    assert sends == ([4 if per_connection < MiB else 1] * 3 if copy_path == "native" else [])


def _conns(engine: Engine) -> list[Any]:
    return [c for pool in engine._tcp._pools.values() for c in pool if c is not None]


def test_a_waited_write_batch_takes_its_replies_natively_and_gives_its_slots_back(
    copy_path: str, metadata_url: str, peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transfer_pages of >= 1 MiB over tcp: each connection's receiver thread takes the OK
    # reply in C (no reply for a slot read by Python), and every slot is free afterwards.
    # Without the native library there are no slots: the batch waits the usual way.
    monkeypatch.setattr(_tcp, "_PAGE_BYTES_PER_CONN", 512 << 10)
    calls: list[str] = []
    slot_reply = _tcp._Conn._slot_reply
    send_pages = NativeCopier.send_pages

    def python_reply(self: _tcp._Conn, request_id: int, error: TransferError | None) -> bool:
        calls.append("python reply")
        return slot_reply(self, request_id, error)

    def sent(self: NativeCopier, *args: Any, **kwargs: Any) -> tuple[int, list[int]]:
        calls.append("send_pages")
        return send_pages(self, *args, **kwargs)

    monkeypatch.setattr(_tcp._Conn, "_slot_reply", python_reply)
    monkeypatch.setattr(NativeCopier, "send_pages", sent)
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine:
        local = engine.allocate("local", SEG_BYTES)
        remote = random_bytes(PEER_SEED, SEG_BYTES)
        rng = np.random.default_rng(37)
        for round_ in range(5):
            local[:] = random_bytes(60 + round_, SEG_BYTES)
            offsets = rng.choice(SEG_BYTES // SLOT, 128, replace=False) * SLOT
            engine.transfer_pages(
                Op.WRITE, "local", "kv", local_offsets=offsets,
                remote_offsets=offsets[::-1].copy(), lengths=SLOT, transport="tcp",
            )  # fmt: skip
            remote = _expected(remote, local, offsets[::-1], offsets, [SLOT] * 128)
            assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(remote)
        conns = _conns(engine)
        assert len(conns) == 4
        for conn in conns:
            assert not conn._pending
            if copy_path == "python":
                assert conn.slots is None
                continue
            assert sorted(conn.slots.free) == list(range(_tcp._REPLY_SLOTS))
            assert not conn.slots.states.any()
            assert not conn.slots.ids.any()
    assert calls == (["send_pages"] * 5 if copy_path == "native" else [])


def test_a_waited_write_batch_whose_replies_python_reads_still_finishes(
    metadata_url: str, peer: PeerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reply can reach Python's reader first (bytes already buffered there): the OK of an
    # armed slot then settles it from Python. Here the receivers never wait in C at all.
    replies: list[int] = []
    slot_reply = _tcp._Conn._slot_reply

    def spy(self: _tcp._Conn, request_id: int, error: TransferError | None) -> bool:
        replies.append(request_id)
        return slot_reply(self, request_id, error)

    monkeypatch.setattr(_tcp._Conn, "_await_native", lambda *_, **__: None)
    monkeypatch.setattr(_tcp._Conn, "_slot_reply", spy)
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=2)) as engine:
        local = engine.allocate("local", SEG_BYTES)
        local[:] = random_bytes(73, SEG_BYTES)
        offsets = np.arange(128) * SLOT
        engine.transfer_pages(
            Op.WRITE, "local", "kv", local_offsets=offsets, remote_offsets=offsets,
            lengths=SLOT, transport="tcp",
        )  # fmt: skip
        expected = random_bytes(PEER_SEED, SEG_BYTES)
        expected[: 128 * SLOT] = local[: 128 * SLOT]
        assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(expected)
        native = any(c.slots is not None for c in _conns(engine))
    assert len(replies) == (2 if native else 0)


def test_a_waited_write_batch_without_free_slots_waits_the_usual_way(
    copy_path: str, metadata_url: str, peer: PeerProcess
) -> None:
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=2)) as engine:
        local = engine.allocate("local", SEG_BYTES)
        local[:] = random_bytes(70, SEG_BYTES)
        offsets = np.arange(128) * SLOT
        call = {
            "local_offsets": offsets, "remote_offsets": offsets, "lengths": SLOT,
            "transport": "tcp",
        }  # fmt: skip
        engine.transfer_pages(Op.WRITE, "local", "kv", **call)  # connects
        taken = [(c, s) for c in _conns(engine) if c.slots for s in c.slots.free]
        for conn in _conns(engine):
            if conn.slots:
                conn.slots.free.clear()  # every slot held elsewhere
        assert len(taken) == (2 * _tcp._REPLY_SLOTS if copy_path == "native" else 0)
        local[:] = random_bytes(71, SEG_BYTES)
        engine.transfer_pages(Op.WRITE, "local", "kv", **call)
        expected = random_bytes(PEER_SEED, SEG_BYTES)
        expected[: 128 * SLOT] = local[: 128 * SLOT]
        assert peer.command(f"hash kv 0 {SEG_BYTES}") == _sha(expected)
        for conn, slot in taken:
            conn.give_slot(slot)


def test_an_error_reply_fails_a_waited_write_batch(metadata_url: str) -> None:
    # The owner withdraws the segment after the writer looked it up: the peer answers each
    # frame with an error, which fails every page (the receiver hands it to Python).
    with (
        Engine(EngineConfig(metadata_url=metadata_url)) as owner,
        Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine,
    ):
        name = f"brief-{uuid.uuid4().hex[:8]}"
        owner.allocate(name, SEG_BYTES)
        engine.allocate("local", SEG_BYTES)
        offsets = np.arange(128) * SLOT
        call = {
            "local_offsets": offsets, "remote_offsets": offsets, "lengths": SLOT,
            "transport": "tcp",
        }  # fmt: skip
        engine.transfer_pages(Op.WRITE, "local", name, **call)
        owner.unregister(name)
        with pytest.raises(BatchFailed) as failed:
            engine.transfer_pages(Op.WRITE, "local", name, **call)
        errors = failed.value.failures
        assert set(errors) == set(range(128))
        assert all(isinstance(e, SegmentNotFound) for e in errors.values()), errors
        for conn in _conns(engine):
            assert conn.slots is None or not conn.slots.states.any()


def test_a_waited_write_batch_to_a_frozen_peer_fails_at_its_deadline_then_recovers(
    metadata_url: str, start_peer: Callable[..., PeerProcess]
) -> None:
    # 2 MiB fits the socket buffers: every frame is out, and no reply comes. At the deadline
    # each page fails with a timeout naming it; the connections are replaced afterwards.
    peer = start_peer(f"sleepy:{SEG_BYTES}:shm:5")
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine:
        local = engine.allocate("local", SEG_BYTES)
        offsets = np.arange(128) * SLOT
        call = {
            "local_offsets": offsets, "remote_offsets": offsets, "lengths": SLOT,
            "transport": "tcp",
        }  # fmt: skip
        engine.transfer_pages(Op.WRITE, "local", "sleepy", **call)
        peer.freeze()
        started = time.monotonic()
        try:
            with pytest.raises(BatchFailed) as failed:
                engine.transfer_pages(Op.WRITE, "local", "sleepy", timeout_s=0.5, **call)
            took = time.monotonic() - started
        finally:
            peer.thaw()
        assert 0.5 <= took < WAIT_S
        errors = failed.value.failures
        assert set(errors) == set(range(128))
        assert all(isinstance(e, TransferTimeout | PeerUnavailable) for e in errors.values())
        for e in errors.values():
            if isinstance(e, TransferTimeout):
                assert "write of 16384 bytes at offset" in str(e)
        local[:] = random_bytes(72, SEG_BYTES)
        engine.transfer_pages(Op.WRITE, "local", "sleepy", **call)
        expected = random_bytes(5, SEG_BYTES)
        expected[: 128 * SLOT] = local[: 128 * SLOT]
        assert peer.command(f"hash sleepy 0 {SEG_BYTES}") == _sha(expected)


def test_killed_peer_fails_a_big_write_batch_within_the_deadline(
    metadata_url: str, start_peer: Callable[..., PeerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The frames of a 2 MiB WRITE go out at once on 4 connections to a frozen peer (they fill
    # the socket buffers and wait); the peer dies: every page fails, nothing hangs.
    monkeypatch.setattr(_tcp, "_PAGE_BYTES_PER_CONN", 512 << 10)
    doomed = start_peer(f"doomed:{SEG_BYTES}:shm:1")
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine:
        engine.allocate("local", SEG_BYTES)
        offsets = np.arange(128) * SLOT
        engine.transfer_pages(
            Op.WRITE, "local", "doomed", local_offsets=offsets[:2], remote_offsets=offsets[:2],
            lengths=SLOT, transport="tcp",
        )  # fmt: skip
        doomed.freeze()
        done: list[BaseException | None] = []

        def write() -> None:
            try:
                engine.transfer_pages(
                    Op.WRITE, "local", "doomed", local_offsets=offsets, remote_offsets=offsets,
                    lengths=SLOT, transport="tcp", timeout_s=WAIT_S,
                )  # fmt: skip
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.5)  # the frames are out, or blocked in the socket buffers
        doomed.kill()
        writer.join(WAIT_S)
        assert not writer.is_alive()
    (error,) = done
    assert isinstance(error, BatchFailed), error
    assert set(error.failures) == set(range(128))
    assert all(isinstance(e, PeerUnavailable) for e in error.failures.values())


def test_killed_peer_fails_the_page_batch_within_the_deadline(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    doomed = start_peer(f"doomed:{SEG_BYTES}:shm:1")
    start_peer(f"healthy:{MiB}:shm:2")
    local = engine.allocate("local", SEG_BYTES)
    offsets = np.arange(128) * SLOT
    engine.transfer_pages(
        Op.READ,
        "local",
        "doomed",
        local_offsets=offsets[:2],
        remote_offsets=offsets[:2],
        lengths=SLOT,
        transport="tcp",
    )
    # Freeze it first, so the batch is certainly in flight when the kill lands.
    doomed.freeze()
    batch = engine.submit_pages(
        Op.READ,
        "local",
        "doomed",
        local_offsets=offsets,
        remote_offsets=offsets,
        lengths=SLOT,
        transport="tcp",
        timeout_s=WAIT_S,
    )
    assert not batch.poll()
    doomed.kill()
    outcomes = batch.wait(timeout_s=WAIT_S)
    assert all(o.status is RequestStatus.FAILED for o in outcomes)
    assert all(isinstance(o.error, PeerUnavailable) for o in outcomes), [o.error for o in outcomes]
    assert set(batch.failures()) == set(range(128))
    # The engine serves the next peer.
    engine.transfer_pages(
        Op.READ,
        "local",
        "healthy",
        local_offsets=[0],
        remote_offsets=[0],
        lengths=MiB,
        transport="tcp",
    )
    np.testing.assert_array_equal(local[:MiB], random_bytes(2, MiB))


def test_hung_peer_fails_a_batch_stuck_in_sending_by_its_deadline(
    metadata_url: str, start_peer: Callable[..., PeerProcess]
) -> None:
    # 64 MiB of pages, 16 MiB per connection, to a frozen peer: the sends fill the socket
    # buffers and block; at the deadline each fails, and the engine reconnects afterwards.
    size = 64 * MiB
    peer = start_peer(f"sleepy:{size}:shm:4")
    with Engine(EngineConfig(metadata_url=metadata_url, tcp_connections=4)) as engine:
        local = engine.allocate("local", size)
        offsets = np.arange(size // SLOT) * SLOT
        engine.transfer_pages(
            Op.WRITE, "local", "sleepy", local_offsets=offsets[:2], remote_offsets=offsets[:2],
            lengths=SLOT, transport="tcp",
        )  # fmt: skip
        peer.freeze()
        started = time.monotonic()
        try:
            with pytest.raises(BatchFailed) as failed:
                engine.transfer_pages(
                    Op.WRITE, "local", "sleepy", local_offsets=offsets, remote_offsets=offsets,
                    lengths=SLOT, transport="tcp", timeout_s=0.5,
                )  # fmt: skip
            assert time.monotonic() - started < WAIT_S
        finally:
            peer.thaw()
        errors = failed.value.failures
        assert set(errors) == set(range(len(offsets)))
        assert all(isinstance(e, TransferTimeout | PeerUnavailable) for e in errors.values())
        local[:SLOT] = 9
        engine.transfer_pages(
            Op.WRITE, "local", "sleepy", local_offsets=[0], remote_offsets=[0], lengths=SLOT,
            transport="tcp",
        )  # fmt: skip
        expected = np.full(SLOT, 9, dtype=np.uint8)
        assert peer.command(f"hash sleepy 0 {SLOT}") == _sha(expected)


def test_hung_peer_fails_each_page_by_its_deadline_then_recovers(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    peer = start_peer(f"sleepy:{SEG_BYTES}:shm:4")
    local = engine.allocate("local", SEG_BYTES)
    offsets = np.arange(64) * SLOT
    engine.transfer_pages(
        Op.READ,
        "local",
        "sleepy",
        local_offsets=offsets,
        remote_offsets=offsets,
        lengths=SLOT,
        transport="tcp",
    )
    peer.freeze()
    try:
        batch = engine.submit_pages(
            Op.WRITE,
            "local",
            "sleepy",
            local_offsets=offsets,
            remote_offsets=offsets,
            lengths=SLOT,
            transport="tcp",
            timeout_s=0.5,
        )
        batch.wait(timeout_s=WAIT_S)  # raises TransferTimeout if a request outlives WAIT_S
        failures = batch.failures()
        assert set(failures) == set(range(64))
        assert all(isinstance(e, TransferTimeout | PeerUnavailable) for e in failures.values())
        timeouts = [e for e in failures.values() if isinstance(e, TransferTimeout)]
        # Unless the connection was closed first: the message names the page and the peer.
        for e in timeouts:
            assert "write of 16384 bytes at offset" in str(e)
            assert (
                f"of segment 'sleepy' did not complete within 0.5 s on peer {peer.address}"
                in str(e)
            )
    finally:
        peer.thaw()
    # (Written pages that land after the thaw hold what the first READ fetched: no change.)
    local[:] = 0
    engine.transfer_pages(
        Op.READ,
        "local",
        "sleepy",
        local_offsets=offsets,
        remote_offsets=offsets,
        lengths=SLOT,
        transport="tcp",
    )
    np.testing.assert_array_equal(local[: 64 * SLOT], random_bytes(4, SEG_BYTES)[: 64 * SLOT])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_pages(metadata_url: str, peer: PeerProcess, transport: str) -> None:
    local_offsets, remote_offsets, lengths = _scattered(600, 50)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncEngine(EngineConfig(metadata_url=metadata_url)) as engine:
            local = await engine.allocate("local", SEG_BYTES)
            local[:] = random_bytes(601, SEG_BYTES)
            sent = local.copy()
            await engine.transfer_pages(
                Op.WRITE,
                "local",
                "kv",
                local_offsets=local_offsets,
                remote_offsets=remote_offsets,
                lengths=lengths,
                transport=transport,
            )
            local[:] = 0
            batch = await engine.submit_pages(
                Op.READ,
                "local",
                "kv",
                local_offsets=local_offsets,
                remote_offsets=remote_offsets,
                lengths=lengths,
                transport=transport,
            )
            outcomes = await engine.wait(batch, timeout_s=WAIT_S)
            assert all(o.ok for o in outcomes)
            return sent, local.copy()

    sent, back = asyncio.run(main())
    expected = _expected(np.zeros(SEG_BYTES, np.uint8), sent, local_offsets, local_offsets, lengths)
    np.testing.assert_array_equal(back, expected)
