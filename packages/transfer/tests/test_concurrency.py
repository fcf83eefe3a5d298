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


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_many_threads_submitting_concurrently(
    engine: Engine, start_peer: Callable[..., PeerProcess], transport: str
) -> None:
    region = THREADS * PAGES_PER_BATCH * PAGE
    peer = start_peer(f"shared:{region}:shm")
    local = engine.allocate("local", region)
    local[:] = np.random.default_rng(0).integers(0, 256, region, dtype=np.uint8)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            base = t * PAGES_PER_BATCH * PAGE  # each thread owns its slice: results are checkable
            for b in range(BATCHES_PER_THREAD):
                op = Op.WRITE if b % 2 == 0 else Op.READ
                requests = [
                    TransferRequest(op, "local", base + p * PAGE, "shared", base + p * PAGE, PAGE)
                    for p in range(PAGES_PER_BATCH)
                ]
                outcomes = engine.submit(requests, transport=transport).wait(
                    timeout_s=JOIN_TIMEOUT_S
                )
                assert all(o.status is RequestStatus.DONE for o in outcomes), outcomes
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive(), "a submitting thread hung"
    assert not errors, errors
    # The last round of every thread was a READ of what it wrote: both sides hold local's bytes.
    assert peer.command(f"hash shared 0 {region}") == hashlib.sha256(local.data).hexdigest()
