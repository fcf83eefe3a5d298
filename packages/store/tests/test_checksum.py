"""The end-to-end checksum: KVH-64 for new objects (XXH3-64 where it has no native code);
XXH3-64 and CRC-32 records from older versions stay readable and verified."""

from __future__ import annotations

import json
import signal
import time
import zlib

import numpy as np
import pytest
import xxhash

from kvstack.store import InvalidArgument, ReplicaUnavailable, StoreClient, StoreError
from kvstack.store import _client as client_module
from kvstack.store._checksum import ChecksumKind, checksum, parse_kind, writer_kind
from kvstack.store._master import Entry
from kvstack.store._wire import Op
from kvstack.store.errors import error_from_wire
from kvstack.transfer._kvhash import kvhash64_reference

from .conftest import Cluster

# 0 B, a 4 KiB page (hashed during PUT_START), 1 MB (hashed inside the same-host copy), and
# past DIRECT_MAX_BYTES (written by the engine, hashed after).
SIZES = [0, 4096, 1000003, (5 << 20) + 3]


def _expected(kind: ChecksumKind, value: bytes) -> int:
    if kind is ChecksumKind.KVH_64:
        return kvhash64_reference(value)
    return xxhash.xxh3_64_intdigest(value)


def _located(client: StoreClient, key: str) -> client_module._Located:
    loc = client._locate([key], time.monotonic() + 30)[0]
    assert not isinstance(loc, StoreError), loc
    return loc


@pytest.mark.parametrize("size", SIZES)
def test_put_commits_the_writer_kind_checksum_of_the_bytes(client: StoreClient, size: int) -> None:
    value = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    client.put(f"sum/{size}", value)
    loc = _located(client, f"sum/{size}")
    assert loc.checksum_kind is writer_kind()
    assert loc.checksum == _expected(loc.checksum_kind, value)
    assert client.get(f"sum/{size}") == value


def test_put_batch_commits_each_items_checksum(client: StoreClient) -> None:
    rng = np.random.default_rng(5)
    values = {f"sumb/{n}": rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES}
    client.put_batch(values).raise_for_errors()
    for key, value in values.items():
        loc = _located(client, key)
        assert loc.checksum_kind is writer_kind()
        assert loc.checksum == _expected(loc.checksum_kind, value), key
    out = client.get_batch(list(values))
    assert [o.unwrap() for o in out] == list(values.values())


def test_writer_uses_kvh_64_where_it_is_native() -> None:
    from kvstack.transfer import native_hashing  # noqa: PLC0415 -- the one test that asks

    assert writer_kind() is (ChecksumKind.KVH_64 if native_hashing() else ChecksumKind.XXH3_64)


def test_checksum_kinds() -> None:
    data = b"kvstack" * 100_000
    assert checksum(data, ChecksumKind.KVH_64) == kvhash64_reference(data)
    assert checksum(data, ChecksumKind.XXH3_64) == xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data), ChecksumKind.CRC32) == zlib.crc32(data)
    assert parse_kind(None, what="x") is ChecksumKind.CRC32  # records from before the kind
    assert parse_kind("xxh3-64", what="x") is ChecksumKind.XXH3_64
    assert parse_kind("kvh-64", what="x") is ChecksumKind.KVH_64


def test_xxh3_objects_and_kvh_objects_read_side_by_side(
    client: StoreClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Objects of both kinds (written by a process without native KVH-64, and by this one) in
    # one batch: each is verified with its own kind, on the fused and the plain read paths.
    rng = np.random.default_rng(11)
    old = {f"mixk/x{i}": rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes() for i in range(4)}
    new = {f"mixk/k{i}": rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes() for i in range(4)}
    monkeypatch.setattr(client_module, "writer_kind", lambda: ChecksumKind.XXH3_64)
    client.put_batch(old).raise_for_errors()
    client.put("mixk/x-one", old["mixk/x0"])
    monkeypatch.undo()
    client.put_batch(new).raise_for_errors()
    assert _located(client, "mixk/x0").checksum_kind is ChecksumKind.XXH3_64
    assert _located(client, "mixk/x-one").checksum_kind is ChecksumKind.XXH3_64
    keys = [*old, *new]
    buffers = [np.empty(1 << 20, dtype=np.uint8) for _ in keys]
    client.get_into_batch(keys, buffers).raise_for_errors()
    for key, buffer in zip(keys, buffers, strict=True):
        assert buffer.tobytes() == {**old, **new}[key], key
    assert client.get("mixk/x-one") == old["mixk/x0"]


@pytest.mark.parametrize(
    ("commit", "complaint"),
    [
        ({"checksum": 1}, "checksum_kind None"),
        ({"checksum": 1, "checksum_kind": "md5"}, "checksum_kind 'md5'"),
        ({"checksum_kind": "kvh-64"}, "needs an int checksum"),
    ],
)
def test_commit_without_a_known_kind_is_refused(
    client: StoreClient, commit: dict[str, object], complaint: str
) -> None:
    key = f"badkind/{len(complaint)}"
    reply = client._master.call(Op.PUT_START, {"items": [{"key": key, "size": 8}]}, timeout_s=10)
    put_id = reply["items"][0]["ok"]["put_id"]
    reply = client._master.call(
        Op.PUT_COMMIT, {"items": [{"put_id": put_id, **commit}]}, timeout_s=10
    )
    error = error_from_wire(reply["items"][0]["error"])
    assert isinstance(error, InvalidArgument)
    assert complaint in str(error)
    assert key in str(error)
    assert not client.exists(key)
    client.put(key, b"12345678")  # the refused put freed its space and the master serves on
    assert client.get(key) == b"12345678"


def test_record_with_an_unknown_kind_fails_clearly() -> None:
    record = {"size": 1, "checksum": 7, "checksum_kind": "sha-9", "replicas": [], "want": 1}
    with pytest.raises(StoreError) as info:
        Entry.from_record("k/1", record)
    assert "record of key 'k/1'" in str(info.value)
    assert "'sha-9'" in str(info.value)


def test_crc32_records_from_an_older_version_stay_readable_and_verified(
    make_cluster: Cluster,
) -> None:
    # An older master logged CRC-32 values without a kind. After an upgrade those objects are
    # still read and checked with CRC-32; a wrong value is still a typed error, never bytes.
    data_dir = make_cluster.tmp / "master"
    make_cluster.start_master("--data-dir", str(data_dir))
    make_cluster.start_node("n0", "32MiB")
    writer = make_cluster.client()
    good, bad = b"g" * 70_000, b"b" * 5000
    writer.put("old/good", good)
    writer.put("old/bad", bad)
    writer.put("new/one", b"n" * 3000)

    master = make_cluster.master
    assert master is not None
    master.send_signal(signal.SIGKILL)
    master.wait(timeout=30)
    wal = data_dir / "wal.jsonl"
    records = [json.loads(line) for line in wal.read_text().splitlines()]
    for record in records:
        entry = record.get("entry")
        if entry is not None and record["key"].startswith("old/"):
            del entry["checksum_kind"]
            # old/bad gets the CRC-32 of other bytes: its replica must fail verification.
            entry["checksum"] = zlib.crc32(good if record["key"] == "old/good" else b"other")
    wal.write_text("".join(json.dumps(r) + "\n" for r in records))
    make_cluster._spawn_master(int(make_cluster.address.rsplit(":", 1)[1]))

    reader = make_cluster.client(timeout_s=5.0)
    assert reader.get("old/good") == good
    assert reader.get("new/one") == b"n" * 3000
    with pytest.raises(ReplicaUnavailable) as info:
        reader.get("old/bad")
    assert "checksum" in str(info.value)
    # Overwriting an old object commits the writer's kind.
    reader.put("old/good", b"fresh", overwrite=True)
    assert _located(reader, "old/good").checksum_kind is writer_kind()
    assert reader.get("old/good") == b"fresh"
