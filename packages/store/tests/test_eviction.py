"""Eviction under memory pressure and the disk tier, on embedded stores (one process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstack.store import MasterConfig, NoSpace, PutOptions, StoreClient

KiB = 1 << 10
OBJECT = 64 * KiB
# 4 MiB of memory = 64 objects; 200 puts force repeated eviction passes.
MEMORY = "4MiB"
PUTS = 200


def _value(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, OBJECT, dtype=np.uint8).tobytes()


def _config() -> MasterConfig:
    # A lease far longer than the test: the leased object must survive every pass.
    return MasterConfig(lease_s=300.0, high_watermark=0.9, low_watermark=0.6)


def test_eviction_never_touches_leased_or_pinned_objects() -> None:
    with StoreClient.embedded(MEMORY, master_config=_config()) as client:
        client.put("pinned", _value(10_001), options=PutOptions(hard_pin=True))
        client.put("leased", _value(10_002))
        assert client.get("leased") == _value(10_002)  # takes a read lease
        client.put("soft", _value(10_003), options=PutOptions(soft_pin=True))
        for i in range(PUTS):
            client.put(f"fill/{i}", _value(i))
        assert client.get("pinned") == _value(10_001)
        assert client.get("leased") == _value(10_002)
        assert client.get("soft") == _value(10_003)  # soft-pinned objects go last
        present = client.exists_batch([f"fill/{i}" for i in range(PUTS)]).values()
        assert not all(present)  # eviction happened ...
        assert present[-1]  # ... least recently used first
        for i in range(PUTS):
            if present[i]:
                assert client.get(f"fill/{i}") == _value(i)
        stats = client.stats()
        assert stats["utilisation"] <= 1.0


def test_no_space_when_everything_is_pinned() -> None:
    with StoreClient.embedded("1MiB", master_config=_config()) as client:
        stored = 0
        while stored < 16:  # 1 MiB holds 16 objects of 64 KiB
            client.put(f"p/{stored}", _value(stored), options=PutOptions(hard_pin=True))
            stored += 1
        with pytest.raises(NoSpace, match=r"'p/16' \(65536 bytes x 1 replicas\)"):
            client.put("p/16", _value(16), options=PutOptions(hard_pin=True))
        for i in range(8):
            assert client.get(f"p/{i}") == _value(i)


def test_disk_tier_demotes_instead_of_dropping_and_promotes_on_read(tmp_path: Path) -> None:
    config = MasterConfig(lease_s=0.2, high_watermark=0.9, low_watermark=0.6)
    with StoreClient.embedded(MEMORY, disk_dir=str(tmp_path), master_config=config) as client:
        for i in range(PUTS):
            client.put(f"d/{i}", _value(i))
        stats = client.stats()
        assert stats["objects"] == PUTS  # nothing dropped
        assert stats["objects_on_disk_only"] > 0
        assert any(tmp_path.rglob("*.bin"))
        for i in range(PUTS):
            assert client.get(f"d/{i}") == _value(i)  # promoted back where needed
        client.remove("d/0")
        assert not client.exists("d/0")
