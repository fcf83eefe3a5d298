"""AsyncEngine: the Engine's API for asyncio, running blocking work on its own executor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from kvstack.transfer._batch import Batch
from kvstack.transfer._config import EngineConfig
from kvstack.transfer._engine import Engine, PageColumn
from kvstack.transfer._types import BufferItem, Op, SegmentInfo, TransferOutcome, TransferRequest
from kvstack.transfer.errors import TransferTimeout

__all__ = ["AsyncEngine"]

_T = TypeVar("_T")


class AsyncEngine:
    """An Engine driven from asyncio. Nothing blocks the event loop: submits (which may push
    bytes into sockets or memcpy) run on this engine's executor, waits are completion callbacks.
    """

    def __init__(self, config: EngineConfig | None = None, *, max_workers: int = 4) -> None:
        self.engine = Engine(config)
        self._executor = ThreadPoolExecutor(
            max_workers, thread_name_prefix="kvstack-transfer-async"
        )

    @property
    def address(self) -> str:
        return self.engine.address

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def register(self, name: str, buffer: object, *, readonly: bool = False) -> SegmentInfo:
        return await self._run(self.engine.register, name, buffer, readonly=readonly)

    async def allocate(self, name: str, size_bytes: int | str) -> np.ndarray:
        return await self._run(self.engine.allocate, name, size_bytes)

    async def unregister(self, name: str) -> None:
        await self._run(self.engine.unregister, name)

    async def lookup(self, name: str) -> SegmentInfo:
        return await self._run(self.engine.lookup, name)

    async def wait_for(self, name: str, *, timeout_s: float) -> SegmentInfo:
        return await self._run(self.engine.wait_for, name, timeout_s=timeout_s)

    async def submit(
        self, requests: Sequence[TransferRequest], *, transport: str | None = None
    ) -> Batch:
        return await self._run(self.engine.submit, requests, transport=transport)

    async def wait(self, batch: Batch, timeout_s: float | None = None) -> list[TransferOutcome]:
        """Await every request of ``batch``; same contract as ``Batch.wait``."""
        await self._until_done(batch, timeout_s)
        return batch.outcomes()

    async def _until_done(self, batch: Batch, timeout_s: float | None = None) -> None:
        # wait() without the outcomes: the transfer helpers need none (a page batch would
        # build a TransferRequest per page for them).
        if batch.done:
            return
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def _set() -> None:
            if not finished.done():
                finished.set_result(None)

        batch.add_done_callback(lambda _batch: loop.call_soon_threadsafe(_set))
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        while not batch.done:
            until = batch._next_deadline()
            if give_up is not None:
                until = min(until, give_up)
            try:
                await asyncio.wait_for(asyncio.shield(finished), max(0.0, until - time.monotonic()))
            except TimeoutError:
                batch.poll()  # fails overdue requests
                if give_up is not None and not batch.done and time.monotonic() >= give_up:
                    raise TransferTimeout(
                        f"batch of {len(batch)} requests", timeout_s=timeout_s or 0.0
                    ) from None

    async def transfer(
        self, requests: Sequence[TransferRequest], *, transport: str | None = None
    ) -> None:
        """Submit, await, and raise BatchFailed naming every failed request, if any."""
        batch = await self.submit(requests, transport=transport)
        await self._until_done(batch)
        batch.raise_for_errors()

    async def submit_buffers(
        self,
        op: Op,
        items: Sequence[BufferItem],
        *,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> Batch:
        """Engine.submit_buffers on this engine's executor; await ``wait(batch)`` next."""
        return await self._run(
            self.engine.submit_buffers, op, items, timeout_s=timeout_s, transport=transport
        )

    async def transfer_buffers(
        self,
        op: Op,
        items: Sequence[BufferItem],
        *,
        timeout_s: float | None = None,
        transport: str | None = None,
    ) -> None:
        """Submit caller buffers, await, and raise BatchFailed naming every failed item."""
        batch = await self.submit_buffers(op, items, timeout_s=timeout_s, transport=transport)
        await self._until_done(batch)
        batch.raise_for_errors()

    async def submit_pages(
        self,
        op: Op,
        local: str,
        remote: str,
        *,
        local_offsets: PageColumn,
        remote_offsets: PageColumn,
        lengths: int | PageColumn,
        transport: str | None = None,
        timeout_s: float | None = None,
    ) -> Batch:
        """Engine.submit_pages on this engine's executor; await ``wait(batch)`` next."""
        return await self._run(
            self.engine.submit_pages,
            op,
            local,
            remote,
            local_offsets=local_offsets,
            remote_offsets=remote_offsets,
            lengths=lengths,
            transport=transport,
            timeout_s=timeout_s,
        )

    async def transfer_pages(
        self,
        op: Op,
        local: str,
        remote: str,
        *,
        local_offsets: PageColumn,
        remote_offsets: PageColumn,
        lengths: int | PageColumn,
        transport: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Submit a page batch as arrays, await it, and raise BatchFailed naming every failed
        request, if any."""
        batch = await self.submit_pages(
            op,
            local,
            remote,
            local_offsets=local_offsets,
            remote_offsets=remote_offsets,
            lengths=lengths,
            transport=transport,
            timeout_s=timeout_s,
        )
        await self._until_done(batch)
        batch.raise_for_errors()

    async def read(self, local: str, remote: str, length: int, **kwargs: Any) -> None:
        """Engine.read, awaited (same keyword arguments)."""
        await self._run(self.engine.read, local, remote, length, **kwargs)

    async def write(self, local: str, remote: str, length: int, **kwargs: Any) -> None:
        """Engine.write, awaited (same keyword arguments)."""
        await self._run(self.engine.write, local, remote, length, **kwargs)

    async def write_tensor(self, tensor: Any, remote: str, **kwargs: Any) -> None:
        await self._run(self.engine.write_tensor, tensor, remote, **kwargs)

    async def read_into_tensor(self, tensor: Any, remote: str, **kwargs: Any) -> None:
        await self._run(self.engine.read_into_tensor, tensor, remote, **kwargs)

    async def aclose(self) -> None:
        await self._run(self.engine.close)
        self._executor.shutdown(wait=False)
