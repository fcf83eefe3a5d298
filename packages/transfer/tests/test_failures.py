"""Dead, hung and restarted peers: typed errors by the deadline, no hangs, others unaffected."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest

from kvstack.transfer import (
    Engine,
    EngineConfig,
    Op,
    PeerUnavailable,
    RequestStatus,
    SegmentNotFound,
    TransferRequest,
    TransferTimeout,
)
from kvstack.transfer._peer import PeerProcess, random_bytes

MiB = 1 << 20
# Far longer than anything here should take, short enough that a hang fails the test quickly.
WAIT_S = 60.0


# (pages, page bytes): KV pages travel in vectored frames, big requests in stripes.
KILL_SHAPES = [(64, 16 << 10), (16, MiB)]


@pytest.mark.parametrize(("pages", "page"), KILL_SHAPES, ids=["vectored", "striped"])
def test_peer_killed_mid_batch_fails_its_requests_and_engine_serves_the_next_peer(
    engine: Engine, start_peer: Callable[..., PeerProcess], pages: int, page: int
) -> None:
    doomed = start_peer(f"doomed:{16 * MiB}:shm:1")
    start_peer(f"healthy:{MiB}:shm:2")
    engine.allocate("local", 16 * MiB)
    # Pipelined connections up (a batch; one-off reads use the thread's own lane).
    engine.transfer([TransferRequest(Op.READ, "local", 0, "doomed", 0, 4096)], transport="tcp")
    # Freeze it first, so the batch is certainly in flight when the kill lands.
    doomed.freeze()
    requests = [
        TransferRequest(Op.READ, "local", i * page, "doomed", i * page, page) for i in range(pages)
    ]
    batch = engine.submit(requests, transport="tcp")
    assert not batch.poll()
    doomed.kill()
    outcomes = batch.wait(timeout_s=WAIT_S)
    assert all(o.status is RequestStatus.FAILED for o in outcomes)
    assert all(isinstance(o.error, PeerUnavailable) for o in outcomes), [o.error for o in outcomes]
    assert set(batch.failures()) == set(range(pages))

    local = engine.array("local")
    engine.read("local", "healthy", MiB, transport="tcp")
    np.testing.assert_array_equal(local[:MiB], random_bytes(2, MiB))


def test_partially_failed_batch_reports_which_requests_failed(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    start_peer(f"good:{MiB}:shm:3")
    engine.allocate("local", MiB)
    requests = [
        TransferRequest(Op.READ, "local", 0, "good", 0, 4096),
        TransferRequest(Op.READ, "local", 4096, "missing", 0, 4096),
        TransferRequest(Op.READ, "local", 8192, "good", MiB - 10, 4096),
        TransferRequest(Op.READ, "local", 12288, "good", 4096, 4096),
    ]
    for transport in ("shm", "tcp"):
        batch = engine.submit(requests, transport=transport)
        batch.wait(timeout_s=WAIT_S)
        assert batch.statuses() == [
            RequestStatus.DONE,
            RequestStatus.FAILED,
            RequestStatus.FAILED,
            RequestStatus.DONE,
        ]
        assert sorted(batch.failures()) == [1, 2]
        with pytest.raises(Exception, match=r"2 of 4 requests failed \(indices \[1, 2\]\)"):
            batch.raise_for_errors()


# One-off reads up to the stripe size go over the calling thread's own connection (a lane);
# bigger ones over the pipelined, striped connections: both must honour deadlines and recover.
ONE_OFF_SIZES = [4096, MiB]


@pytest.mark.parametrize("length", ONE_OFF_SIZES)
def test_hung_peer_times_out_within_the_deadline_then_recovers(
    engine: Engine, start_peer: Callable[..., PeerProcess], length: int
) -> None:
    peer = start_peer(f"sleepy:{MiB}:shm:4")
    local = engine.allocate("local", MiB)
    engine.read("local", "sleepy", length, transport="tcp")
    peer.freeze()
    try:
        with pytest.raises(TransferTimeout, match=r"did not complete within 0\.5 s"):
            engine.read("local", "sleepy", length, timeout_s=0.5, transport="tcp")
    finally:
        peer.thaw()
    local[:] = 0
    engine.read("local", "sleepy", length, transport="tcp")
    np.testing.assert_array_equal(local[:length], random_bytes(4, MiB)[:length])


@pytest.mark.parametrize("length", ONE_OFF_SIZES)
def test_engine_reconnects_when_a_killed_peer_returns(
    engine: Engine, start_peer: Callable[..., PeerProcess], length: int
) -> None:
    first = start_peer(f"phoenix:{MiB}:bytes:5")
    local = engine.allocate("local", MiB)
    engine.read("local", "phoenix", length)
    first.kill()
    with pytest.raises(PeerUnavailable):
        engine.read("local", "phoenix", length, timeout_s=10)
    start_peer(f"phoenix:{MiB}:bytes:6")  # same name, new process, new port
    engine.read("local", "phoenix", length, timeout_s=10)
    np.testing.assert_array_equal(local[:length], random_bytes(6, MiB)[:length])


def test_killed_shm_owner_is_detected(
    metadata_url: str, engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    peer = start_peer(f"gone:{MiB}:shm:7")
    engine.allocate("local", MiB)
    engine.read("local", "gone", MiB, transport="shm")
    peer.kill()
    # Cached mapping: the owner's pid is checked per batch.
    with pytest.raises(PeerUnavailable, match="has exited"):
        engine.write("local", "gone", 64, transport="shm")
    # Fresh lookup: a dead same-host owner's segments are gone.
    with Engine(EngineConfig(metadata_url=metadata_url)) as fresh, pytest.raises(SegmentNotFound):
        fresh.lookup("gone")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_unregistered_segment_is_refused(metadata_url: str, engine: Engine, transport: str) -> None:
    with Engine(EngineConfig(metadata_url=metadata_url)) as owner:
        owner.allocate("brief", 4096)
        engine.allocate("local", 4096)
        engine.read("local", "brief", 4096, transport=transport)
        owner.unregister("brief")
        with pytest.raises(SegmentNotFound, match="'brief'"):
            engine.read("local", "brief", 4096, transport=transport)
        with pytest.raises(SegmentNotFound):
            engine.lookup("brief")


def test_closed_engine_unregisters_everything(metadata_url: str, engine: Engine) -> None:
    owner = Engine(EngineConfig(metadata_url=metadata_url))
    owner.allocate("a", 4096)
    owner.register("b", bytearray(10))
    shm_name = owner.segments()[0].shm_name
    owner.close()
    assert shm_name is not None
    assert not os.path.exists(f"/dev/shm/{shm_name}")
    for name in ("a", "b"):
        with pytest.raises(SegmentNotFound):
            engine.lookup(name)
