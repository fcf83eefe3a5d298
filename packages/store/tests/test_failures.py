"""Failures with real processes: kill -9 a node mid-workload, kill -9 and restart the master."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from kvstack.store import (
    AlreadyExists,
    MasterConfig,
    NotFound,
    PutOptions,
    ReplicaUnavailable,
    StoreClient,
    StoreError,
)
from kvstack.store._master import run_master_in_thread

from .conftest import Cluster

DEADLINE_S = 60.0


def _value(i: int) -> bytes:
    size = int(np.random.default_rng(i).integers(1, 64 << 10))
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()


def _wait_for(what: str, condition: Callable[[], object], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)  # polling a condition with a deadline


def _replica_nodes(client: StoreClient, key: str) -> list[str]:
    loc = client._locate([key], time.monotonic() + 30)[0]
    assert not isinstance(loc, StoreError), loc
    return [node for node, _seg, _off in loc.replicas]


def test_kill_9_node_mid_workload_loses_nothing(
    make_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_cluster.start_master()
    for i in range(3):
        make_cluster.start_node(f"n{i}", "64MiB")
    # tcp: a dead node's bytes are unreachable (over shm its mapping would outlive it), so
    # reads must really fail over to the surviving replica.
    monkeypatch.setenv("KVSTACK_TRANSFER_TRANSPORTS", "tcp")
    writer = make_cluster.client()
    reader = make_cluster.client()
    committed: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            key = f"w/{i}"
            try:
                writer.put(key, _value(i), options=PutOptions(replicas=2))
            except StoreError:
                pass  # a put in flight to the killed node may fail; it was never committed
            else:
                with lock:
                    committed[key] = _value(i)
            i += 1

    victim = ""
    thread = threading.Thread(target=write)
    thread.start()
    try:
        _wait_for("100 committed puts", lambda: len(committed) >= 100)
        victim = _replica_nodes(writer, "w/0")[0]
        make_cluster.kill_node(victim)
        # Reads fail over to the surviving replica at once: no waiting for the master to
        # notice the death (over tcp, the dead node's replica fails and the next is read).
        with lock:
            early = dict(list(committed.items())[:50])
        for key, value in early.items():
            assert reader.get(key) == value
        _wait_for("200 more puts", lambda: len(committed) >= len(early) + 200)
    except BaseException as exc:
        failures.append(exc)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures
    with lock:
        snapshot = dict(committed)
    for key, value in snapshot.items():
        assert reader.get(key) == value, key

    # The master declares the node dead and re-replication restores two replicas each.
    def restored() -> bool:
        stats = reader.stats()
        return victim not in stats["nodes"] and stats["under_replicated"] == 0

    _wait_for("re-replication", restored)
    for key in list(snapshot)[:50]:
        nodes = _replica_nodes(reader, key)
        assert len(set(nodes)) == 2
        assert victim not in nodes
        assert reader.get(key) == snapshot[key]


@pytest.mark.parametrize("backend", ["wal", "redis"])
def test_master_kill_9_and_restart_keeps_every_committed_object(
    make_cluster: Cluster, request: pytest.FixtureRequest, backend: str
) -> None:
    if backend == "wal":
        make_cluster.start_master("--data-dir", str(make_cluster.tmp / "master"))
    else:
        # A hash of its own per test run: the session's Redis is shared.
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/3"
        redis.Redis.from_url(url).flushdb()
        make_cluster.start_master("--redis-url", url)
    for i in range(3):
        make_cluster.start_node(f"n{i}", "32MiB")
    client = make_cluster.client()
    values = {f"m/{i}": _value(1000 + i) for i in range(200)}
    client.put_batch(values.items(), options=PutOptions(replicas=2)).raise_for_errors()
    client.put("m/0", b"overwritten", overwrite=True)
    values["m/0"] = b"overwritten"
    client.remove("m/1")
    del values["m/1"]

    make_cluster.restart_master()

    # The old client's pooled connections died with the master: it reconnects by itself,
    # over TCP (the old master's Unix socket died with it; a new one has a new name).
    client.put("after/restart", b"x")
    assert client._master._unix == ""
    values["after/restart"] = b"x"
    fresh = make_cluster.client()
    # Nodes re-register on their next poll; until then reads retry within their deadline.
    got = fresh.get_batch(list(values))
    assert got.values() == list(values.values())
    assert not fresh.exists("m/1")
    stats = fresh.stats()
    assert stats["objects"] == len(values)
    # New puts work and do not overlap the recovered objects.
    fresh.put_batch({f"new/{i}": b"n" * 5000 for i in range(100)}.items()).raise_for_errors()
    assert fresh.get_batch(list(values)).values() == list(values.values())


def test_node_frozen_past_timeout_comes_back_as_new_generation(make_cluster: Cluster) -> None:
    make_cluster.start_master()
    for i in range(3):
        make_cluster.start_node(f"n{i}", "16MiB")
    client = make_cluster.client()
    values = {f"f/{i}": _value(2000 + i) for i in range(60)}
    client.put_batch(values.items(), options=PutOptions(replicas=2)).raise_for_errors()
    frozen = make_cluster.nodes["n0"]
    frozen.send_signal(signal.SIGSTOP)  # alive but silent: the master must declare it dead
    try:
        _wait_for("n0 declared dead", lambda: "n0" not in client.stats()["nodes"])
    finally:
        frozen.send_signal(signal.SIGCONT)
    _wait_for("n0 back", lambda: "n0" in client.stats()["nodes"])
    _wait_for("re-replication", lambda: client.stats()["under_replicated"] == 0)
    more = {f"g/{i}": _value(3000 + i) for i in range(60)}
    client.put_batch(more.items(), options=PutOptions(replicas=2)).raise_for_errors()
    everything = {**values, **more}
    assert client.get_batch(list(everything)).values() == list(everything.values())


def test_single_put_when_its_node_died_mid_put(make_cluster: Cluster) -> None:
    """``put`` (one item, its own path) when the master still places on a killed node."""
    make_cluster.start_master()
    for i in range(2):
        make_cluster.start_node(f"n{i}", "16MiB")
    client = make_cluster.client()
    client.put("before", b"b" * 4096, options=PutOptions(replicas=2))
    make_cluster.kill_node("n0")  # dead, not yet declared: PUT_START still places on it
    # Its only replica on the dead node: a typed error, the key stays invisible, space freed.
    with pytest.raises(ReplicaUnavailable, match=r"'lost'.*node 'n0'"):
        client.put("lost", b"x" * 4096, options=PutOptions(preferred_node="n0"))
    with pytest.raises(NotFound):
        client.get("lost")
    # One of two replicas on it: committed with the survivor, byte-identical.
    value = _value(7)
    client.put("half", value, options=PutOptions(replicas=2))
    assert client.get("half") == value
    assert _replica_nodes(client, "half") == ["n1"]
    with pytest.raises(AlreadyExists, match="'half'"):
        client.put("half", b"other")
    assert client.get("half") == value
    client.put("half", b"new", overwrite=True)
    assert client.get("half") == b"new"
    assert client.get("before") == b"b" * 4096
    assert client.stats()["pending_puts"] == 0


def test_running_usage_total_matches_the_allocators(
    make_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The master's O(1) usage total (PUT_START's watermark check) never drifts from the
    allocators: across puts, overwrites, removes under lease, a node death and re-replication."""
    master, stop = run_master_in_thread(MasterConfig(heartbeat_timeout_s=3.0, lease_s=0.3))
    try:
        make_cluster.address = master.address
        for i in range(3):
            make_cluster.start_node(f"n{i}", "16MiB")
        client = make_cluster.client()
        values = {f"u/{i}": _value(4000 + i) for i in range(40)}
        client.put_batch(values.items(), options=PutOptions(replicas=2)).raise_for_errors()
        for i in range(10):
            client.put(f"u/{i}", _value(5000 + i), overwrite=True, options=PutOptions(replicas=2))
            client.get(f"u/{10 + i}")  # a read lease: the remove below frees it later
            client.remove(f"u/{10 + i}")
        make_cluster.kill_node("n0")
        _wait_for("n0 declared dead", lambda: "n0" not in client.stats()["nodes"])
        _wait_for("re-replication", lambda: client.stats()["under_replicated"] == 0)
        _wait_for("deferred frees", lambda: client.stats()["deferred_frees"] == 0)

        def exact() -> int:
            nodes = list(master._nodes.values())
            return sum(a.used_bytes for n in nodes for a in n.segments.values())

        assert master._memory_used() == exact()
        assert not [r for r in caplog.records if "drifted" in r.getMessage()]
    finally:
        make_cluster.close()  # clients and nodes first: they hold connections to the master
        stop()
