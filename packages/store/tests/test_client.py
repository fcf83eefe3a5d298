"""The client API against a real master and three real nodes (separate processes)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from kvstack.store import (
    AlreadyExists,
    AsyncStoreClient,
    ClientConfig,
    InvalidArgument,
    InvalidKey,
    NoSpace,
    NotFound,
    PutOptions,
    ReplicaUnavailable,
    StoreClient,
)
from kvstack.transfer import Op as TransferOp

from .conftest import SHARED_HEARTBEAT_TIMEOUT_S, Cluster

MiB = 1 << 20
# 0 B (an empty object is not a missing one), odd sizes around alignment and page edges, several
# MiB, and 64 MiB (larger than the transfer engine's 4 MiB tcp stripes, fits one 96 MiB node).
SIZES = [0, 1, 63, 64, 65, 4095, 4096, 4097, MiB + 7, 9 * MiB + 1, 64 * MiB]


def _value(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B-seed{s % 997}" for s in SIZES])
def test_round_trip_is_byte_identical(client: StoreClient, size: int) -> None:
    data = _value(size % 997, size)
    key = f"rt/{size}"
    client.put(key, data)
    got = client.get(key)
    assert len(got) == size
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    buf = bytearray(size + 5)
    assert client.get_into(key, buf) == size
    assert bytes(buf[:size]) == data
    client.remove(key)
    assert not client.exists(key)


def test_missing_key_raises_not_found_never_empty_bytes(client: StoreClient) -> None:
    with pytest.raises(NotFound, match="'no/such/key'"):
        client.get("no/such/key")
    with pytest.raises(NotFound):
        client.remove("no/such/key")
    client.put("empty", b"")
    assert client.get("empty") == b""


def test_put_existing_key_needs_overwrite(client: StoreClient) -> None:
    client.put("dup", b"first")
    with pytest.raises(AlreadyExists, match=r"'dup'.*overwrite=True"):
        client.put("dup", b"second")
    assert client.get("dup") == b"first"
    client.put("dup", b"second", overwrite=True)
    assert client.get("dup") == b"second"


def test_bad_input_gets_clear_errors(client: StoreClient) -> None:
    with pytest.raises(InvalidKey, match="exceeds the limit of 1024 bytes"):
        client.put("k" * 1025, b"x")
    with pytest.raises(InvalidKey, match="must not be empty"):
        client.get("")
    with pytest.raises(InvalidKey, match="keys are str, got int"):
        client.put(7, b"x")  # pyrefly: ignore[bad-argument-type] -- the wrong type is the test
    with pytest.raises(InvalidArgument, match="got dict"):
        client.put("k", {"not": "bytes"})
    client.put("small", b"abc")
    with pytest.raises(InvalidArgument, match="smaller than key 'small'"):
        client.get_into("small", bytearray(2))
    with pytest.raises(InvalidArgument, match="read-only"):
        client.get_into("small", b"xyz")
    with pytest.raises(NoSpace, match="'huge'"):
        client.put("huge", np.zeros(200 * MiB, dtype=np.uint8))


def test_batches_report_a_typed_outcome_per_item(client: StoreClient) -> None:
    client.put("b/exists", b"old")
    result = client.put_batch([("b/1", b"one"), ("b/exists", b"new"), ("", b"x"), ("b/2", b"")])
    assert [o.ok for o in result] == [True, False, False, True]
    assert isinstance(result[1].error, AlreadyExists)
    assert isinstance(result[2].error, InvalidKey)
    got = client.get_batch(["b/1", "b/missing", "b/2"])
    assert got[0].value == b"one"
    assert isinstance(got[1].error, NotFound)
    assert got[2].value == b""
    assert [o.value for o in client.exists_batch(["b/1", "b/missing"])] == [True, False]
    removed = client.remove_batch(["b/1", "b/missing"])
    assert removed[0].ok
    assert isinstance(removed[1].error, NotFound)


def test_zero_copy_batch_into_one_preallocated_buffer(client: StoreClient) -> None:
    values = [_value(100 + i, 256 << 10) for i in range(24)]
    keys = [f"zc/{i}" for i in range(24)]
    client.put_from_batch(keys, values).raise_for_errors()
    dest = np.zeros(24 * (256 << 10), dtype=np.uint8)
    views = [dest[i * (256 << 10) : (i + 1) * (256 << 10)] for i in range(24)]
    assert client.get_into_batch(keys, views).values() == [256 << 10] * 24
    assert dest.tobytes() == b"".join(values)


def test_one_batch_get_into_mixes_outcomes_and_fails_over(client: StoreClient) -> None:
    # One batch carries every item; each keeps its own outcome. The same-host items are copied
    # and hashed in one native pass; "mix/bad" has a corrupted first replica, which must fail
    # its checksum and be read from the second one.
    big = {f"mix/{i}": _value(300 + i, MiB) for i in range(8)}
    client.put_batch(big).raise_for_errors()
    client.put("mix/empty", b"")
    bad = _value(399, 5000)
    client.put("mix/bad", bad, options=PutOptions(replicas=2))
    loc = client._locate(["mix/bad"], deadline=__import__("time").monotonic() + 30)[0]
    assert not isinstance(loc, Exception)
    _node, segment, offset = loc.replicas[0]
    client._engine.transfer_buffers(TransferOp.WRITE, [(b"garbage!", segment, offset)])

    keys = [*big, "mix/missing", "mix/empty", "mix/bad", "mix/0"]
    buffers = [np.zeros(MiB, dtype=np.uint8) for _ in big]
    buffers += [bytearray(8), bytearray(0), bytearray(5000), bytearray(10)]  # last: too small
    result = client.get_into_batch(keys, buffers)
    assert [o.ok for o in result] == [True] * 8 + [False, True, True, False]
    assert [result[i].value for i in range(8)] == [MiB] * 8
    for key, buf in zip(big, buffers, strict=False):
        assert bytes(buf) == big[key]
    assert isinstance(result[8].error, NotFound)
    assert result[9].value == 0
    assert bytes(buffers[10]) == bad
    assert isinstance(result[11].error, InvalidArgument)
    assert "smaller than key 'mix/0'" in str(result[11].error)


# 4 KiB and 1 MiB are copied straight from the node's mapping; 8 MiB goes through the engine.
CORRUPTION_SIZES = [4096, 1 << 20, 8 << 20]


@pytest.mark.parametrize("size", CORRUPTION_SIZES)
def test_get_verifies_and_fails_over_on_the_same_host_path(client: StoreClient, size: int) -> None:
    # Objects up to DIRECT_MAX_BYTES are copied straight from the node's mapping
    # (Engine.map_segment); a corrupted first replica must still fail its checksum and be read
    # from the second one, and a corrupted only replica must raise, never return wrong bytes.
    value = _value(401, size)
    two, one = f"direct/{size}/two", f"direct/{size}/one"
    client.put(two, value, options=PutOptions(replicas=2))
    client.put(one, value)
    for key in (two, one):
        loc = client._locate([key], deadline=__import__("time").monotonic() + 30)[0]
        assert not isinstance(loc, Exception)
        _node, segment, offset = loc.replicas[0]
        client._engine.transfer_buffers(TransferOp.WRITE, [(b"garbage!", segment, offset)])
    assert client.get(two) == value
    into = bytearray(size)
    assert client.get_into(two, into) == size
    assert bytes(into) == value
    quick = StoreClient(ClientConfig(master=client.config.master, timeout_s=0.5))
    try:
        with pytest.raises(ReplicaUnavailable) as info:
            quick.get(one)
        assert "checksum" in str(info.value)
    finally:
        quick.close()


def test_client_that_never_polls_for_replies(cluster: Cluster) -> None:
    # reply_spin_s=0: every request sleeps in poll() for its reply (the pre-issue-4 behaviour).
    sleeper = cluster.client(reply_spin_s=0.0)
    value = _value(402, 4096)
    sleeper.put("sleeper/a", value)
    assert sleeper.get("sleeper/a") == value
    assert sleeper.exists_batch(["sleeper/a", "sleeper/b"]).values() == [True, False]


def test_batch_put_and_get_from_many_threads(client: StoreClient) -> None:
    # Each thread puts and reads back its own batch of mixed sizes through the one client.
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for round_ in range(5):
                items = {f"thr/{t}/{round_}/{i}": _value(t * 50 + i, 1000 * i) for i in range(6)}
                client.put_batch(items).raise_for_errors()
                outs = [bytearray(len(v)) for v in items.values()]
                client.get_into_batch(list(items), outs).raise_for_errors()
                assert [bytes(o) for o in outs] == list(items.values())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_replicas_land_on_distinct_nodes_preferred_first(client: StoreClient) -> None:
    client.put("rep/3", b"x" * 1000, options=PutOptions(replicas=3, preferred_node="n2"))
    loc = client._locate(["rep/3"], deadline=__import__("time").monotonic() + 30)[0]
    assert not isinstance(loc, Exception)
    nodes = [node for node, _seg, _off in loc.replicas]
    assert sorted(nodes) == ["n0", "n1", "n2"]
    assert nodes[0] == "n2"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)),
        lambda: torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
        lambda: torch.randn(8, 4).to(torch.bfloat16),
        lambda: torch.tensor([True, False, True]),
        lambda: np.random.default_rng(0).standard_normal((4, 6)).astype(np.float16),
        lambda: np.arange(10, dtype=">i4"),  # big-endian survives
        lambda: np.zeros((0, 3), dtype=np.float32),  # empty tensors keep their shape
    ],
    ids=["torch-f32", "torch-i64", "torch-bf16", "torch-bool", "np-f16", "np-be-i4", "np-empty"],
)
def test_tensors_keep_dtype_and_shape(
    client: StoreClient,
    make: Callable[[], torch.Tensor | np.ndarray],
    request: pytest.FixtureRequest,
) -> None:
    value = make()
    key = f"tensor/{request.node.name}"
    client.put_tensor(key, value)
    got = client.get_tensor(key)
    assert type(got) is type(value)
    assert got.dtype == value.dtype
    assert tuple(got.shape) == tuple(value.shape)
    if isinstance(value, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, value)
        into_tensor = torch.empty_like(value)
        client.get_tensor_into(key, into_tensor)
        assert torch.equal(into_tensor, value)
    else:
        np.testing.assert_array_equal(got, value)
        into_array = np.empty_like(value)
        client.get_tensor_into(key, into_array)
        np.testing.assert_array_equal(into_array, value)


def test_get_tensor_into_checks_dtype_and_shape(client: StoreClient) -> None:
    client.put_tensor("tensor/checked", torch.ones(2, 3))
    with pytest.raises(InvalidArgument, match=r"shape \[2, 3\].*shape \[3, 2\]"):
        client.get_tensor_into("tensor/checked", torch.empty(3, 2))
    client.put("not-a-tensor", b"abc")
    with pytest.raises(InvalidArgument, match="put_tensor"):
        client.get_tensor("not-a-tensor")


def test_state_dict_one_writer_many_readers_zero_copy(cluster: Cluster) -> None:
    writer = cluster.client()
    readers = [cluster.client() for _ in range(3)]
    gen = torch.Generator().manual_seed(1)
    state = {"embed.weight": torch.randn(64, 32, generator=gen), "lm.bias": torch.randn(32)}
    for version in (1, 2, 3):
        state = {k: v + version for k, v in state.items()}
        writer.publish_state_dict("model", state, version=version, keep_versions=2)
        for reader in readers:
            into = {k: torch.empty_like(v) for k, v in state.items()}
            pointers = {k: v.data_ptr() for k, v in into.items()}
            got_version, loaded = reader.load_state_dict("model", into)
            assert got_version == version
            for name, tensor in state.items():
                assert loaded[name].data_ptr() == pointers[name]  # filled in place
                assert torch.equal(loaded[name], tensor)
    assert not writer.exists("model/v1/manifest")  # older than keep_versions: removed
    _, fresh = readers[0].load_state_dict("model", version=2)
    assert set(fresh) == set(state)


def test_client_contributing_memory_is_a_node(cluster: Cluster) -> None:
    contributor = cluster.client(contribute_bytes=8 << 20)
    assert contributor.local_node is not None
    contributor.put(
        "mine", b"local bytes", options=PutOptions(preferred_node=contributor.local_node)
    )
    loc = contributor._locate(["mine"], __import__("time").monotonic() + 30)[0]
    assert not isinstance(loc, Exception)
    assert loc.replicas[0][0] == contributor.local_node
    assert cluster.client().get("mine") == b"local bytes"


def test_async_client(cluster: Cluster) -> None:
    async def main() -> None:
        async with AsyncStoreClient(ClientConfig(master=cluster.address)) as client:
            await client.put("async/a", b"alpha")
            assert await client.get("async/a") == b"alpha"
            results = await asyncio.gather(
                *(client.put(f"async/{i}", bytes([i])) for i in range(20))
            )
            assert results == [None] * 20
            got = await client.get_batch([f"async/{i}" for i in range(20)])
            assert got.values() == [bytes([i]) for i in range(20)]
            with pytest.raises(NotFound):
                await client.get("async/missing")
            assert await client.exists("async/a")
            await client.remove("async/a")

    asyncio.run(main())


def test_stats_report_usage_and_fragmentation(client: StoreClient) -> None:
    stats = client.stats()
    assert stats["objects"] > 0
    assert set(stats["nodes"]) >= {"n0", "n1", "n2"}
    segment = next(iter(stats["nodes"]["n0"]["segments"].values()))
    assert 0 <= segment["fragmentation"] <= 1
    assert 0 <= segment["utilisation"] <= 1


def test_concurrent_clients_mixed_ops_no_error_no_leak(make_cluster: Cluster) -> None:
    make_cluster.start_master("--lease", "0.5", heartbeat_timeout_s=SHARED_HEARTBEAT_TIMEOUT_S)
    for i in range(3):
        make_cluster.start_node(f"c{i}", "32MiB")
    clients = [make_cluster.client() for _ in range(16)]
    errors: list[BaseException] = []

    def work(n: int, client: StoreClient) -> None:
        rng = np.random.default_rng(n)
        mine: dict[str, bytes] = {}
        try:
            for i in range(1000):
                op = rng.integers(0, 10)
                if op < 4 or not mine:
                    key = f"mix/{n}/{i}"
                    value = rng.integers(
                        0, 256, int(rng.integers(0, 8192)), dtype=np.uint8
                    ).tobytes()
                    client.put(key, value, options=PutOptions(replicas=int(rng.integers(1, 3))))
                    mine[key] = value
                elif op < 8:
                    key = list(mine)[int(rng.integers(0, len(mine)))]
                    assert client.get(key) == mine[key]
                elif op < 9:
                    key = list(mine)[int(rng.integers(0, len(mine)))]
                    client.remove(key)
                    del mine[key]
                else:
                    assert not client.exists(f"mix/{n}/absent")
            for key in mine:
                client.remove(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors[:3]
    # Every allocation comes back once the last read leases end (0.5 s here).
    deadline = __import__("time").monotonic() + 30
    while True:
        stats = clients[0].stats()
        if stats["used_bytes"] == 0 or __import__("time").monotonic() > deadline:
            break
        threading.Event().wait(0.05)  # polling with a deadline
    assert stats["objects"] == 0
    assert stats["pending_puts"] == 0
    assert stats["used_bytes"] == 0, stats
