"""Prefill/decode disaggregation: KV memory peers can write, the handshake, and the KV push.

The flow of one request (the router picked prefill worker P and decode worker D):

1. D reserves blocks for the prompt (waiting for free blocks if needed), then posts
   ``/kv/prefill`` to P: request and trace id, prompt, sampling, D's ``KVLayout``, D's KV
   segment and the reserved block ids. This is the handshake.
2. P refuses a layout that differs from its own (409, before any byte moves), else prefills
   the prompt as a one-token request whose blocks it holds when done, pushes those blocks into
   D's segment through ``kvstack.transfer`` (one WRITE per run of adjacent blocks: the cache is
   block-major, so a block is one contiguous range), releases them and answers with the first
   token and its timings. Its 200 means every byte landed.
3. D activates the request with that token and decodes, streaming to the router.

Failure: if P is unreachable, answers an error, or D's deadline passes, D fails the request
before its first byte (the router may retry another pair) and frees the blocks after a fence:
at once plus ``FENCE_DEAD_S`` when P is gone (bytes already queued on D's own tcp receiver can
still land), or after the longest a push may still run when P might be alive. If D goes away,
P's handler is cancelled: P waits for a push in flight to end, then releases its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import httpx2
import numpy as np
import torch

from kvstack.serve._async_engine import AsyncEngine
from kvstack.serve._engine import LLMEngine
from kvstack.serve._request import RequestOutput
from kvstack.serve._sampling import SamplingParams
from kvstack.serve.errors import HandoffError, InvalidRequest, KVLayoutMismatch, ServeError
from kvstack.transfer import Engine, EngineConfig, Op, TransferError

__all__ = [
    "PREFILL_HEADER",
    "TIMINGS_HEADER",
    "DecodeHandoff",
    "HandoffTimings",
    "KVLayout",
    "KVSpace",
    "PrefillService",
    "WorkerMode",
    "coalesce_runs",
]

logger = logging.getLogger(__name__)

# Router -> decode worker: the prefill worker's URL for this request.
PREFILL_HEADER = "x-kvstack-prefill"
# Decode worker -> router: the handoff's phase timings (JSON of HandoffTimings).
TIMINGS_HEADER = "x-kvstack-timings"
# After P died: how long its last bytes may still be landing through D's own tcp receiver.
FENCE_DEAD_S = 0.2
_ABORTED_LIMIT = 4096


class WorkerMode(StrEnum):
    """What a worker does: everything, only prefills for decode workers, or only decodes."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What two workers must agree on before one writes KV blocks into the other."""

    fingerprint: str
    block_size: int
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_nbytes: int

    @classmethod
    def of(cls, engine: LLMEngine) -> KVLayout:
        """The layout of ``engine``'s cache."""
        mc = engine.model.config
        return cls(
            fingerprint=engine.model.fingerprint,
            block_size=engine.config.block_size,
            dtype=engine.config.dtype,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            block_nbytes=engine.cache.block_nbytes,
        )

    @classmethod
    def from_wire(cls, data: object) -> KVLayout:
        """Parse the handshake's ``layout`` object; InvalidRequest names a bad field."""
        if not isinstance(data, dict):
            raise InvalidRequest("layout", f"must be an object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for name, kind in (
            ("fingerprint", str),
            ("block_size", int),
            ("dtype", str),
            ("num_layers", int),
            ("num_kv_heads", int),
            ("head_dim", int),
            ("block_nbytes", int),
        ):
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InvalidRequest(f"layout.{name}", f"must be a {kind.__name__}, got {value!r}")
            values[name] = value
        return cls(**values)

    def check(self, theirs: KVLayout) -> None:
        """Raise KVLayoutMismatch naming the first field that differs."""
        for name, ours in asdict(self).items():
            other = getattr(theirs, name)
            if ours != other:
                raise KVLayoutMismatch(name, ours, other)


class KVSpace:
    """A worker's KV cache memory, registered with a transfer engine so peers can write it."""

    def __init__(
        self, transfer: Engine, *, nbytes: int, device: torch.device, owns_engine: bool
    ) -> None:
        self.transfer = transfer
        self.segment = f"kvstack-serve-kv-{uuid.uuid4().hex[:16]}"
        self._owns_engine = owns_engine
        if device.type == "cuda":
            self.memory = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            transfer.register(self.segment, self.memory)
        else:
            host: np.ndarray = transfer.allocate(self.segment, nbytes)
            self.memory = torch.from_numpy(host)
        logger.info("KV cache of %d bytes registered as %s", nbytes, self.segment)

    @classmethod
    def create(cls, metadata_url: str, *, nbytes: int, device: torch.device) -> KVSpace:
        """A transfer engine of its own on ``metadata_url``, holding the KV memory."""
        return cls(
            Engine(EngineConfig(metadata_url=metadata_url)),
            nbytes=nbytes,
            device=device,
            owns_engine=True,
        )

    def close(self) -> None:
        """Unregister the memory (and close the engine when this owns it)."""
        with contextlib.suppress(TransferError):
            self.transfer.unregister(self.segment)
        if self._owns_engine:
            self.transfer.close()


def coalesce_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, count)`` runs where both block lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


@dataclass(frozen=True, slots=True)
class HandoffTimings:
    """One handoff's phases (seconds) and size, as the decode worker saw them."""

    alloc_wait_s: float = 0.0
    handshake_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    transfer_bytes: int = 0
    cached_tokens: int = 0
    store_cached_tokens: int = 0

    def header(self) -> str:
        """The value of TIMINGS_HEADER."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> HandoffTimings | None:
        """Read TIMINGS_HEADER back; None when it is malformed."""
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError):
            return None


def _sampling_wire(params: SamplingParams) -> dict[str, Any]:
    return {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}


class PrefillService:
    """The prefill side: ``/kv/prefill`` runs the prompt and pushes its KV to the decoder."""

    def __init__(self, engine: AsyncEngine, space: KVSpace, *, push_timeout_s: float) -> None:
        self.engine = engine
        self.space = space
        self.layout = KVLayout.of(engine.engine)
        self.push_timeout_s = push_timeout_s
        # Pushes block on copies and sockets: keep them off the event loop.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstack-serve-push")
        self._active: dict[str, asyncio.Task[dict[str, Any]]] = {}
        # Ids aborted before (or while) their handshake arrived: refused if it comes later.
        self._aborted: OrderedDict[str, None] = OrderedDict()

    def close(self) -> None:
        """Stop the push threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _push(self, src: Sequence[int], segment: str, dst: Sequence[int]) -> int:
        # One page batch as int64 columns: over shm the engine checks and copies it in one
        # native call, with no object per run (a request list and its outcomes cost more than
        # the copy: issue #3).
        nbytes = self.layout.block_nbytes
        runs = np.array(coalesce_runs(src, dst), dtype=np.int64).reshape(-1, 3) * nbytes
        self.space.transfer.transfer_pages(
            Op.WRITE,
            self.space.segment,
            segment,
            local_offsets=runs[:, 0].copy(),
            remote_offsets=runs[:, 1].copy(),
            lengths=runs[:, 2].copy(),
            timeout_s=self.push_timeout_s,
        )
        return int(runs[:, 2].sum())

    async def abort(self, request_id: str) -> bool:
        """Stop handoff ``request_id``; returns once no byte of it can still be written.
        True if it was running."""
        self._aborted[request_id] = None
        while len(self._aborted) > _ABORTED_LIMIT:
            self._aborted.popitem(last=False)
        task = self._active.get(request_id)
        if task is None:
            return False
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # its cleanup waits for a push in flight
        return True

    async def handle(self, body: object) -> dict[str, Any]:
        """Run one handshake: prefill, push, answer. Raises ServeError subclasses."""
        if not isinstance(body, dict):
            raise InvalidRequest(None, "the handshake must be a JSON object")
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("request_id", f"must be a non-empty string, got {request_id!r}")
        if request_id in self._active or request_id in self._aborted:
            raise HandoffError(request_id, "prefill", "already running or aborted")
        task = asyncio.create_task(self._handle(request_id, body))
        self._active[request_id] = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Our caller left (the decoder hung up): stop and clean up before unwinding.
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        finally:
            self._active.pop(request_id, None)

    async def _handle(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        arrived = time.monotonic()
        self.layout.check(KVLayout.from_wire(body.get("layout")))
        prompt = body.get("prompt_token_ids")
        if not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise InvalidRequest("prompt_token_ids", "must be a list of token ids")
        segment, blocks = body.get("segment"), body.get("block_ids")
        if not isinstance(segment, str) or not isinstance(blocks, list):
            raise InvalidRequest("segment", "segment (str) and block_ids (list) are required")
        needed = -(-len(prompt) // self.layout.block_size)
        if len(blocks) != needed or not all(isinstance(b, int) and b >= 0 for b in blocks):
            raise InvalidRequest(
                "block_ids", f"needs {needed} block ids >= 0 for {len(prompt)} tokens"
            )
        sampling = body.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise InvalidRequest("sampling", "must be an object")
        params = SamplingParams(
            max_tokens=1,
            temperature=float(sampling.get("temperature", 0.0)),
            top_p=float(sampling.get("top_p", 1.0)),
            seed=sampling.get("seed"),
            ignore_eos=True,
        )
        budget = body.get("deadline_s")
        if not isinstance(budget, int | float) or isinstance(budget, bool) or budget <= 0:
            raise InvalidRequest("deadline_s", f"must be a positive number, got {budget!r}")
        deadline = arrived + float(budget)
        local_id = f"pd-{request_id}"
        trace = body.get("trace_id", "")
        last: RequestOutput | None = None
        push: asyncio.Future[int] | None = None
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + float(budget)):
                async for out in self.engine.generate(local_id, prompt, params, hold_blocks=True):
                    last = out
            if last is None or not last.held_block_ids:
                raise HandoffError(request_id, "prefill", "the prefill ended without its blocks")
            prefilled = time.monotonic()
            if prefilled >= deadline:
                raise HandoffError(request_id, "prefill", "deadline passed before the push")
            loop = asyncio.get_running_loop()
            push = loop.run_in_executor(
                self._pool, self._push, last.held_block_ids, segment, blocks
            )
            try:
                nbytes = await asyncio.shield(push)
            except TransferError as exc:
                raise HandoffError(request_id, segment, f"KV push failed: {exc}") from exc
            pushed = time.monotonic()
        except TimeoutError as exc:
            raise HandoffError(request_id, "prefill", f"no result within {budget} s") from exc
        finally:
            if push is not None and not push.done():
                # Cancelled mid-push (the decoder left): the copy still reads our blocks.
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(push), self.push_timeout_s + 1.0)
            self.engine.release_held(local_id)
        logger.debug("trace %s: prefilled %s and pushed %d bytes", trace, request_id, nbytes)
        return {
            "request_id": request_id,
            "first_token": last.new_token_ids[-1],
            "cached_tokens": last.cached_tokens,
            "store_cached_tokens": last.store_cached_tokens,
            "prefill_s": prefilled - arrived,
            "transfer_s": pushed - prefilled,
            "transfer_bytes": nbytes,
        }


class DecodeHandoff:
    """The decode side: reserve blocks, run the handshake, hand back the first token."""

    def __init__(
        self,
        engine: AsyncEngine,
        space: KVSpace,
        *,
        timeout_s: float,
        push_timeout_s: float,
    ) -> None:
        self.engine = engine
        self.space = space
        self.layout = KVLayout.of(engine.engine)
        self.timeout_s = timeout_s
        self.push_timeout_s = push_timeout_s
        self._client: httpx2.AsyncClient | None = None
        self._fences: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(
                timeout=httpx2.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)),
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    async def close(self) -> None:
        """Close the client; fenced blocks are freed now (the engine is closing)."""
        for task in list(self._fences):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()

    def _release_when_safe(
        self, prefill_url: str, request_id: str, *, answered: bool, cause: BaseException | None
    ) -> None:
        """Free a failed handoff's blocks once the prefill worker can no longer write them."""

        async def release() -> None:
            try:
                if answered or isinstance(cause, httpx2.ConnectError):
                    return  # its handler ended, or it never got the request
                if isinstance(cause, httpx2.TransportError) and not isinstance(
                    cause, httpx2.TimeoutException
                ):
                    # The connection broke: P died. Bytes it queued on our own tcp receiver
                    # may still be landing for a moment.
                    await asyncio.sleep(FENCE_DEAD_S)
                    return
                # Timed out or cancelled: P may be alive and pushing. Ask it to stop.
                try:
                    response = await self.client.post(
                        f"{prefill_url}/kv/abort",
                        json={"request_id": request_id},
                        timeout=self.push_timeout_s + 1.0,
                    )
                    if response.status_code == 200:
                        return
                except httpx2.ConnectError:
                    await asyncio.sleep(FENCE_DEAD_S)
                    return
                except httpx2.HTTPError:
                    pass
                # No word from P: wait out the longest its handshake may still run.
                await asyncio.sleep(self.timeout_s + self.push_timeout_s)
            finally:
                self.engine.abort(request_id)

        task = asyncio.create_task(release())
        self._fences.add(task)
        task.add_done_callback(self._fences.discard)

    async def prefill(
        self,
        prefill_url: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        trace_id: str,
    ) -> tuple[int, HandoffTimings]:
        """Reserve, hand off and wait until the prompt's KV landed: ``(first_token, timings)``.

        Raises HandoffError (the blocks are then freed after their fence) or EngineStopped.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                blocks = await self.engine.reserve(request_id, prompt, params)
        except TimeoutError as exc:
            self.engine.abort(request_id)
            raise HandoffError(request_id, prefill_url, "no free KV blocks in time") from exc
        reserved = time.monotonic()
        body = {
            "request_id": request_id,
            "trace_id": trace_id,
            "prompt_token_ids": prompt,
            "sampling": _sampling_wire(params),
            "layout": asdict(self.layout),
            "segment": self.space.segment,
            "block_ids": blocks,
            "deadline_s": self.timeout_s,
        }
        answered = False
        try:
            try:
                response = await self.client.post(
                    f"{prefill_url}/kv/prefill", json=body, headers={"x-kvstack-trace-id": trace_id}
                )
            except httpx2.TimeoutException as exc:
                raise HandoffError(request_id, prefill_url, f"timed out: {exc!r}") from exc
            except httpx2.HTTPError as exc:
                raise HandoffError(request_id, prefill_url, f"{type(exc).__name__}: {exc}") from exc
            answered = True  # P's handler has ended, its push included
            if response.status_code != 200:
                raise HandoffError(
                    request_id,
                    prefill_url,
                    f"HTTP {response.status_code}: {response.text[:300]}",
                )
            result = response.json()
            first_token = result.get("first_token")
            if not isinstance(first_token, int) or result.get("request_id") != request_id:
                raise HandoffError(request_id, prefill_url, f"bad answer {result!r:.200}")
        except BaseException as exc:
            # Failed or cancelled (our client left): the blocks go back once P cannot write.
            cause = exc.__cause__ if isinstance(exc, HandoffError) else exc
            self._release_when_safe(prefill_url, request_id, answered=answered, cause=cause)
            raise
        done = time.monotonic()
        prefill_s = float(result.get("prefill_s", 0.0))
        transfer_s = float(result.get("transfer_s", 0.0))
        timings = HandoffTimings(
            alloc_wait_s=reserved - started,
            handshake_s=max(0.0, done - reserved - prefill_s - transfer_s),
            prefill_s=prefill_s,
            transfer_s=transfer_s,
            transfer_bytes=int(result.get("transfer_bytes", 0)),
            cached_tokens=int(result.get("cached_tokens", 0)),
            store_cached_tokens=int(result.get("store_cached_tokens", 0)),
        )
        return first_token, timings


def handoff_error_status(exc: ServeError) -> int:
    """HTTP status for a failed handoff: 502 (the router retries another pair)."""
    return 409 if isinstance(exc, KVLayoutMismatch) else 502
