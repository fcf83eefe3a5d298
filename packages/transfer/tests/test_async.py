"""AsyncEngine: the same work awaited from asyncio, on its own executor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from kvstack.transfer import (
    AsyncEngine,
    EngineConfig,
    Op,
    SegmentNotFound,
    TransferRequest,
    TransferTimeout,
)
from kvstack.transfer._peer import PeerProcess, random_bytes

MiB = 1 << 20


def test_async_engine_round_trip(metadata_url: str, start_peer: Callable[..., PeerProcess]) -> None:
    start_peer(f"apeer:{MiB}:shm:21")

    async def scenario() -> None:
        async with AsyncEngine(EngineConfig(metadata_url=metadata_url)) as engine:
            local = await engine.allocate("alocal", MiB)
            await engine.read("alocal", "apeer", MiB, transport="tcp")
            np.testing.assert_array_equal(local, random_bytes(21, MiB))
            local[:] = 9
            await engine.transfer(
                [TransferRequest(Op.WRITE, "alocal", 0, "apeer", 0, MiB)], transport="shm"
            )
            with pytest.raises(SegmentNotFound):
                await engine.lookup("nope")
            # Several batches awaited at once.
            batches = [
                await engine.submit(
                    [TransferRequest(Op.READ, "alocal", i * 4096, "apeer", 0, 4096)],
                    transport="tcp",
                )
                for i in range(8)
            ]
            results = await asyncio.gather(*(engine.wait(b) for b in batches))
            assert all(o.ok for r in results for o in r)
            assert (local[: 8 * 4096] == 9).all()

    asyncio.run(scenario())


def test_async_wait_honours_the_deadline(
    metadata_url: str, start_peer: Callable[..., PeerProcess]
) -> None:
    peer = start_peer(f"astuck:{MiB}:shm:22")

    async def scenario() -> None:
        async with AsyncEngine(EngineConfig(metadata_url=metadata_url)) as engine:
            await engine.allocate("alocal2", MiB)
            await engine.read("alocal2", "astuck", 4096, transport="tcp")
            peer.freeze()
            try:
                batch = await engine.submit(
                    [TransferRequest(Op.READ, "alocal2", 0, "astuck", 0, MiB, timeout_s=0.5)],
                    transport="tcp",
                )
                outcomes = await asyncio.wait_for(engine.wait(batch), 60)
                assert isinstance(outcomes[0].error, TransferTimeout)
            finally:
                peer.thaw()

    asyncio.run(scenario())
