"""Eviction under memory pressure and the disk tier, on embedded stores (one process)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstack.store import MasterConfig, NoSpace, PutOptions, StoreClient
from kvstack.store._wire import Op
from kvstack.store.errors import error_from_wire

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


def _locate(client: StoreClient, key: str) -> dict[str, Any]:
    """A GET as a reader that has located ``key`` and is still copying: a read lease that
    nothing releases (a finished get releases its own with the client's next request)."""
    reply = client._master.call(Op.GET, {"items": [{"key": key}]}, timeout_s=5.0)
    return reply["items"][0]["ok"]


def test_eviction_never_touches_leased_or_pinned_objects() -> None:
    with StoreClient.embedded(MEMORY, master_config=_config()) as client:
        client.put("pinned", _value(10_001), options=PutOptions(hard_pin=True))
        client.put("leased", _value(10_002))
        _locate(client, "leased")  # a reader mid-copy holds a read lease
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


def test_a_put_started_ahead_never_evicts() -> None:
    # Space for a put a client may never make is taken only from free memory below the high
    # watermark: when that is gone, the start is refused and every object stays; the put
    # itself, started the usual way, evicts.
    with StoreClient.embedded(MEMORY, master_config=_config()) as client:

        def room() -> float:  # bytes left below the 0.9 watermark
            stats = client.stats()
            return 0.9 * stats["capacity_bytes"] - stats["used_bytes"]

        stored = 0
        while room() >= 2 * OBJECT:  # until one more object fits below it, and not two
            client.put_batch([(f"full/{stored}", _value(stored))])[0].unwrap()  # no slots
            stored += 1
        assert room() >= OBJECT
        objects = client.stats()["objects"]
        reply = client._master.call(
            Op.PUT_START,
            {"items": [{"size": OBJECT, "anonymous": True}] * 2},
            timeout_s=5.0,
        )
        first, second = reply["items"]
        assert "ok" in first  # room below the watermark for one
        error = error_from_wire(second["error"])
        assert isinstance(error, NoSpace)
        assert "started ahead" in str(error)
        assert not error.transient  # nothing waits for room: the client starts its own put
        assert client.stats()["objects"] == objects  # nothing evicted for it
        client.put("over", _value(99_999))  # a real put past the watermark evicts
        assert client.get("over") == _value(99_999)
        assert client.stats()["objects"] < objects + 1
        client._master.call(
            Op.PUT_ABORT, {"items": [{"put_id": first["ok"]["put_id"]}]}, timeout_s=5.0
        )


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


def test_finished_reads_end_their_leases_so_overwrites_free_at_once() -> None:
    # Overwrite keys right after reading them, far faster than the 300 s leases end: each
    # get's lease is released with the client's next request, so the old versions are freed
    # by the overwrite itself, and eviction never has to drop a live object.
    with StoreClient.embedded(MEMORY, master_config=_config()) as client:
        for i in range(8):
            client.put(f"hot/{i}", _value(i))
        for round_ in range(40):  # 320 overwrites of 64 KiB into 4 MiB
            for i in range(8):
                assert client.get(f"hot/{i}") == _value(8 * round_ + i)
                client.put(f"hot/{i}", _value(8 * (round_ + 1) + i), overwrite=True)
        stats = client.stats()
        assert stats["deferred_frees"] == 0  # each overwrite freed the old version at once
        assert stats["objects"] == 8  # eviction dropped nothing
        for i in range(8):
            assert client.get(f"hot/{i}") == _value(8 * 40 + i)


def test_a_reader_mid_copy_keeps_the_old_version_until_it_is_done() -> None:
    with StoreClient.embedded(MEMORY, master_config=_config()) as client:
        client.put("k", _value(1))
        first = _locate(client, "k")  # two readers of version 1, both still copying
        second = _locate(client, "k")
        assert first["lease"] == second["lease"]
        client.put("k", _value(2), overwrite=True)
        assert client.stats()["deferred_frees"] == 1  # version 1 waits for its readers
        client._master.release([first["lease"]])
        assert client.get("k") == _value(2)  # carries the release: one reader is left
        assert client.stats()["deferred_frees"] == 1
        client._master.release([second["lease"], second["lease"]])  # a repeat is ignored
        client.exists("k")
        assert client.stats()["deferred_frees"] == 0  # the last reader is done: freed
        # The freed space is reusable, and a released lease id never ends a later lease.
        client.put("k", _value(3), overwrite=True)
        third = _locate(client, "k")
        client._master.release([first["lease"]])
        client.put("k", _value(4), overwrite=True)
        assert client.stats()["deferred_frees"] == 1  # third's reader still holds version 3
        assert third["lease"] != first["lease"]


def test_a_late_release_never_ends_the_next_lease() -> None:
    config = MasterConfig(lease_s=0.2, high_watermark=0.9, low_watermark=0.6)
    with StoreClient.embedded(MEMORY, master_config=config) as client:
        client.put("k", _value(1))
        slow = _locate(client, "k")
        time.sleep(0.3)  # the slow reader's lease ended by time
        reader = _locate(client, "k")  # a new lease, under a new id
        assert reader["lease"] != slow["lease"]
        client._master.release([slow["lease"]])  # the slow reader is done, late
        client.put("k", _value(2), overwrite=True)
        assert client.stats()["deferred_frees"] == 1  # the new reader still holds version 1


def test_lease_ids_of_two_masters_do_not_meet() -> None:
    # A client may release an id it got before the master restarted: a new master's ids start
    # elsewhere (at random, in 2**61 .. 2**62), so that id names none of its leases.
    ids = []
    for _ in range(2):
        with StoreClient.embedded(MEMORY, master_config=_config()) as client:
            client.put("k", _value(1))
            ids.append(_locate(client, "k")["lease"])
    assert ids[0] != ids[1]
    assert all(2**61 <= i < 2**62 for i in ids)
