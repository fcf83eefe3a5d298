"""Many threads submitting at once through one engine, over every CPU transport."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import numpy as np
import pytest

from kvstack.transfer import Engine, Op, RequestStatus, TransferRequest
from kvstack.transfer._peer import PeerProcess

THREADS = 8
BATCHES_PER_THREAD = 20
PAGE = 8 << 10
PAGES_PER_BATCH = 8
JOIN_TIMEOUT_S = 120.0


def _run_threads(worker: Callable[[int], None]) -> None:
    """``worker(t)`` on THREADS threads at once; raises the first error any of them raised."""
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            worker(t)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive(), "a submitting thread hung"
    assert not errors, errors


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_many_threads_submitting_concurrently(
    engine: Engine, start_peer: Callable[..., PeerProcess], transport: str
) -> None:
    region = THREADS * PAGES_PER_BATCH * PAGE
    peer = start_peer(f"shared:{region}:shm")
    local = engine.allocate("local", region)
    local[:] = np.random.default_rng(0).integers(0, 256, region, dtype=np.uint8)
    expected = hashlib.sha256(local.data).hexdigest()

    def worker(t: int) -> None:
        base = t * PAGES_PER_BATCH * PAGE  # each thread owns its slice: results are checkable
        for b in range(BATCHES_PER_THREAD):
            op = Op.WRITE if b % 2 == 0 else Op.READ
            requests = [
                TransferRequest(op, "local", base + p * PAGE, "shared", base + p * PAGE, PAGE)
                for p in range(PAGES_PER_BATCH)
            ]
            outcomes = engine.submit(requests, transport=transport).wait(timeout_s=JOIN_TIMEOUT_S)
            assert all(o.status is RequestStatus.DONE for o in outcomes), outcomes

    _run_threads(worker)
    # The last round of every thread was a READ of what it wrote: both sides hold local's first
    # bytes (a lost write would have read the peer's own back).
    assert hashlib.sha256(local.data).hexdigest() == expected
    assert peer.command(f"hash shared 0 {region}") == expected


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_many_threads_moving_page_arrays_concurrently(
    engine: Engine, start_peer: Callable[..., PeerProcess], transport: str
) -> None:
    # int64 columns: over shm, one native check-and-copy per batch. Batches of 512 KiB are
    # shared with the copier's helper threads, which one call owns at a time: the others copy
    # alone. Every thread's pages must still land whole, in shuffled order.
    pages = 64
    region = THREADS * pages * PAGE
    peer = start_peer(f"shared:{region}:shm")
    local = engine.allocate("local", region)
    local[:] = np.random.default_rng(1).integers(0, 256, region, dtype=np.uint8)
    expected = hashlib.sha256(local.data).hexdigest()

    def worker(t: int) -> None:
        rng = np.random.default_rng(100 + t)
        base = t * pages * PAGE
        for b in range(BATCHES_PER_THREAD):
            order = rng.permutation(pages).astype(np.int64)
            offsets = base + order * PAGE
            lengths: np.ndarray | int = PAGE if b % 3 else np.full(pages, PAGE, np.int64)
            engine.transfer_pages(
                Op.WRITE if b % 2 == 0 else Op.READ,
                "local",
                "shared",
                local_offsets=offsets,
                remote_offsets=offsets,
                lengths=lengths,
                transport=transport,
                timeout_s=JOIN_TIMEOUT_S,
            )

    _run_threads(worker)
    assert hashlib.sha256(local.data).hexdigest() == expected  # the last rounds read it back
    assert peer.command(f"hash shared 0 {region}") == expected
