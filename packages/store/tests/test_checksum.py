"""The end-to-end checksum: XXH3-64 for new objects, CRC-32 records from older versions."""

from __future__ import annotations

import json
import signal
import time
import zlib

import numpy as np
import pytest
import xxhash

from kvstack.store import ReplicaUnavailable, StoreClient, StoreError
from kvstack.store._checksum import ChecksumKind, checksum, parse_kind
from kvstack.store._master import Entry

from .conftest import Cluster

# 0 B, a 4 KiB page, and an odd size past XXH3's 240-byte short-input paths.
SIZES = [0, 4096, 1000003]


@pytest.mark.parametrize("size", SIZES)
def test_put_commits_the_xxh3_64_of_the_bytes(client: StoreClient, size: int) -> None:
    value = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    client.put(f"xxh3/{size}", value)
    loc = client._locate([f"xxh3/{size}"], time.monotonic() + 30)[0]
    assert not isinstance(loc, StoreError), loc
    assert loc.checksum_kind is ChecksumKind.XXH3_64
    assert loc.checksum == xxhash.xxh3_64_intdigest(value)
    assert client.get(f"xxh3/{size}") == value


def test_checksum_kinds() -> None:
    data = b"kvstack" * 1000
    assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data), ChecksumKind.CRC32) == zlib.crc32(data)
    assert parse_kind(None, what="x") is ChecksumKind.CRC32  # records from before the kind
    assert parse_kind("xxh3-64", what="x") is ChecksumKind.XXH3_64


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
    # Overwriting an old object commits an XXH3-64 again.
    reader.put("old/good", b"fresh", overwrite=True)
    loc = reader._locate(["old/good"], time.monotonic() + 30)[0]
    assert not isinstance(loc, StoreError), loc
    assert loc.checksum_kind is ChecksumKind.XXH3_64
    assert reader.get("old/good") == b"fresh"
