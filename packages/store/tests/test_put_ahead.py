"""Puts started ahead: a client putting values of one size keeps a put the master started with
its last commit, so each put is one round trip. Real master and node processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvstack.store import AlreadyExists, InvalidKey, StoreClient, StoreError
from kvstack.store import _client as client_module
from kvstack.store._wire import Op
from kvstack.store.errors import error_from_wire

from .conftest import Cluster


@pytest.fixture
def ops(client: StoreClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the master ops the client sends, in order."""
    sent: list[str] = []
    real: Callable[..., dict[str, Any]] = client._master.call

    def call(op: Op, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        ahead = kwargs.get("ahead")
        if ahead is not None:
            sent.append(f"{op.name}+{ahead[0].name}x{len(ahead[1]['items'])}")
        else:
            sent.append(op.name)
        return real(op, data, **kwargs)

    monkeypatch.setattr(client._master, "call", call)
    return sent


def _values(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]


def _settled(client: StoreClient, *, pending: int, timeout_s: float = 15.0) -> dict[str, Any]:
    """The master's stats once ``pending`` puts are in flight (unused ones expire in 2 s) and
    no free waits for a read lease (5 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        if (
            stats["pending_puts"] == pending and not stats["deferred_frees"]
        ) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)  # polling with a deadline


@pytest.mark.parametrize("size", [4096, 1 << 20])
def test_repeated_sizes_take_one_round_trip(client: StoreClient, ops: list[str], size: int) -> None:
    values = _values(5, size, size)
    for i, value in enumerate(values):
        client.put(f"ahead/{size}/{i}", value)
    # The first put sees a new size; the second starts two ahead behind its commit; from then
    # on each put uses one and its commit starts another.
    assert ops == [
        "PUT_START",
        "PUT_COMMIT",
        "PUT_START",
        "PUT_COMMIT+PUT_STARTx2",
        "PUT_COMMIT+PUT_STARTx1",
        "PUT_COMMIT+PUT_STARTx1",
        "PUT_COMMIT+PUT_STARTx1",
    ]
    for i, value in enumerate(values):
        assert client.get(f"ahead/{size}/{i}") == value
    client.put(f"ahead/{size}/other", b"x" * (size + 1))  # another size: the normal path
    assert ops[-2:] == ["PUT_START", "PUT_COMMIT"]
    assert _settled(client, pending=0)["pending_puts"] == 0  # the unused ones expired


def test_a_stale_started_put_is_not_used(
    client: StoreClient, ops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_SLOT_MAX_AGE_S", 0.05)
    values = _values(3, 8192, 3)
    client.put("stale/0", values[0])
    client.put("stale/1", values[1])  # starts two ahead
    time.sleep(0.2)
    client.put("stale/2", values[2])  # too old to use: started afresh
    assert ops == [
        "PUT_START",
        "PUT_COMMIT",
        "PUT_START",
        "PUT_COMMIT+PUT_STARTx2",
        "PUT_START",
        "PUT_COMMIT+PUT_STARTx2",
    ]
    assert [client.get(f"stale/{i}") for i in range(3)] == values


def test_existing_key_through_a_started_put_raises_and_frees(
    client: StoreClient, ops: list[str]
) -> None:
    first, second, third = _values(3, 65536, 4)
    client.put("exists/a", first)
    client.put("exists/b", second)  # starts two ahead
    used = client.stats()["used_bytes"]  # a and b, the started puts, and earlier tests' objects
    with pytest.raises(AlreadyExists):
        client.put("exists/a", third)  # through a started put: refused at commit
    assert ops[-1] == "PUT_COMMIT+PUT_STARTx1", ops
    assert client.get("exists/a") == first
    client.put("exists/a", third, overwrite=True)  # overwrite travels with the commit
    assert client.get("exists/a") == third
    stats = _settled(client, pending=0)
    assert stats["pending_puts"] == 0
    # The refused put's space, the unused started puts and a's first version all came back.
    assert stats["used_bytes"] <= used - 65536


def test_attrs_travel_with_the_commit(client: StoreClient) -> None:
    tensors = [np.arange(1024, dtype=np.float32) * i for i in range(4)]
    for i, t in enumerate(tensors):
        client.put_tensor(f"attrs/{i}", t)  # put_batch: not through started puts
    arrays = [np.full((32, 32), i, dtype=np.int32) for i in range(4)]
    for i, a in enumerate(arrays):
        client._put_one(
            f"attrs/direct/{i}",
            a.reshape(-1).view(np.uint8),
            client_module._DEFAULT_OPTIONS,
            {"tensor": {"lib": "numpy", "dtype": "int32", "shape": [32, 32]}},
        )
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(client.get_tensor(f"attrs/direct/{i}"), a)


def test_master_restart_loses_a_started_put_and_the_put_starts_afresh(
    make_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slot kept across a master restart (only possible with a long max age) fails its
    # commit as unknown; the put then goes the normal way and succeeds.
    monkeypatch.setattr(client_module, "_SLOT_MAX_AGE_S", 60.0)
    make_cluster.start_master("--data-dir", str(make_cluster.tmp / "master"))
    make_cluster.start_node("r0", "32MiB")
    client = make_cluster.client(timeout_s=20.0)
    values = _values(3, 4096, 5)
    client.put("restart/0", values[0])
    client.put("restart/1", values[1])  # starts two ahead
    assert client._take_slot(4096, time.monotonic() + 10) is not None  # one used up ...
    assert client._slots  # ... one kept across the restart
    make_cluster.restart_master()
    client.put("restart/2", values[2])
    assert [client.get(f"restart/{i}") for i in range(3)] == values


def test_anonymous_start_then_a_bad_key_at_commit(client: StoreClient) -> None:
    reply = client._master.call(
        Op.PUT_START, {"items": [{"size": 100, "anonymous": True}]}, timeout_s=10
    )
    started = reply["items"][0]["ok"]
    assert started["expires_s"] == 2.0
    reply = client._master.call(
        Op.PUT_COMMIT,
        {"items": [{"put_id": started["put_id"], "checksum": 1, "checksum_kind": "kvh-64"}]},
        timeout_s=10,
    )
    error = error_from_wire(reply["items"][0]["error"])
    assert isinstance(error, InvalidKey)
    assert "must not be empty" in str(error) or "keys are str" in str(error)
    # A start without a key that is not anonymous is refused as before.
    reply = client._master.call(Op.PUT_START, {"items": [{"size": 100}]}, timeout_s=10)
    assert isinstance(error_from_wire(reply["items"][0]["error"]), InvalidKey)
    assert _settled(client, pending=0)["pending_puts"] == 0


def test_a_start_sent_ahead_is_answered_after_the_commit_and_read_later(
    client: StoreClient,
) -> None:
    # The master answers a commit before it runs the start sent behind it; a bad start does
    # not undo the commit, and its error reaches the callback, read by the next call.
    reply = client._master.call(
        Op.PUT_START, {"items": [{"key": "ahead/bad", "size": 10}]}, timeout_s=10
    )
    put_id = reply["items"][0]["ok"]["put_id"]
    got: list[dict[str, Any] | StoreError] = []
    reply = client._master.call(
        Op.PUT_COMMIT,
        {"items": [{"put_id": put_id, "checksum": 1, "checksum_kind": "kvh-64"}]},
        timeout_s=10,
        ahead=(Op.PUT_START, {"items": [{"size": -1, "anonymous": True}]}, got.append),
    )
    assert reply["items"][0] == {"ok": {}}
    assert not got  # not read yet
    assert client.exists("ahead/bad")  # this call reads it first
    assert len(got) == 1
    first = got[0]
    assert isinstance(first, dict)
    bad = error_from_wire(first["items"][0]["error"])
    assert "size" in str(bad)
    # An error reply to the whole request reaches the callback as the error, via settle.
    client._master.call(
        Op.EXISTS,
        {"items": [{"key": "ahead/bad"}]},
        timeout_s=10,
        ahead=(Op.PUT_START, {"items": "not a list"}, got.append),
    )
    assert len(got) == 1
    client._master.settle(10)
    assert len(got) == 2
    assert isinstance(got[1], StoreError)
    assert "items" in str(got[1])


def test_threads_sharing_a_client_and_its_started_puts(make_cluster: Cluster) -> None:
    # Same-size puts from 8 threads through one client: slots are taken by one thread each,
    # every value reads back, and nothing stays allocated beyond the objects.
    make_cluster.start_master("--lease", "0.5")
    make_cluster.start_node("t0", "64MiB")
    make_cluster.start_node("t1", "64MiB")
    client = make_cluster.client()
    size, per_thread = 16384, 150
    errors: list[BaseException] = []

    def work(n: int) -> None:
        rng = np.random.default_rng(n)
        try:
            for i in range(per_thread):
                value = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                client.put(f"t/{n}/{i}", value)
                if client.get(f"t/{n}/{i}") != value:
                    errors.append(AssertionError(f"t/{n}/{i} read back different bytes"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors[:3]
    stats = _settled(client, pending=0)
    assert stats["objects"] == 8 * per_thread
    assert stats["pending_puts"] == 0
    assert stats["used_bytes"] == 8 * per_thread * size  # 16 KiB is 64-byte aligned


@pytest.mark.parametrize(
    "reply",
    [
        {"items": [{"ok": {"put_id": "p1"}}]},  # no replicas, no expiry
        {"items": [{"ok": {"put_id": "p1", "replicas": [], "expires_s": "soon"}}]},
        {"items": 5},
        {"items": ["not an item"]},
        {},
    ],
)
def test_a_start_reply_it_cannot_use_is_dropped_without_raising(
    client: StoreClient, reply: dict[str, Any]
) -> None:
    # The callback runs inside another call: it must never raise into it.
    before = list(client._slots)
    client._started(123, 4096, time.monotonic(), reply)
    assert client._slots == before
