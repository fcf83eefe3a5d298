"""The engine: one synchronous ``step()`` that schedules, runs the model and samples.

The engine is single-threaded by design; ``AsyncEngine`` drives it from its own thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kvstack.serve._attention import BatchLayout, PagedKVCache, make_attention_backend
from kvstack.serve._config import EngineConfig
from kvstack.serve._kv_cache import BlockPool, KVCacheStats, root_hash
from kvstack.serve._loader import LoadedModel
from kvstack.serve._request import FinishReason, Request, RequestOutput, RequestStatus
from kvstack.serve._sampling import SamplingParams, sample_next
from kvstack.serve._scheduler import Scheduler
from kvstack.serve._store_cache import StoreCacheStats, StorePrefixCache
from kvstack.serve.errors import EngineError, InvalidRequest, PromptTooLong
from kvstack.store import StoreClient

__all__ = ["EngineStats", "LLMEngine", "StepTiming", "kv_cache_size"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One step: tokens run, sequences, seconds."""

    num_tokens: int
    num_seqs: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Queue lengths and KV cache state, for metrics."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    kv: KVCacheStats
    num_transferring: int = 0  # decode side: requests whose prompt KV is being written
    num_held: int = 0  # prefill side: finished prefills whose blocks a handoff still reads
    store_hit_tokens: int = 0  # prompt tokens read from the store instead of computed
    store: StoreCacheStats | None = None


def kv_cache_size(loaded: LoadedModel, config: EngineConfig) -> tuple[int, int]:
    """``(num_blocks, bytes per block)`` of the KV cache ``config`` asks for on this model."""
    mc = loaded.model.config
    per_block = PagedKVCache.bytes_per_block(
        num_layers=mc.num_layers,
        block_size=config.block_size,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        dtype=_DTYPES[config.dtype],
    )
    if config.num_blocks is not None:
        return config.num_blocks, per_block
    return max(1, config.kv_cache_bytes // per_block), per_block


class LLMEngine:
    """Paged KV cache, continuous batching scheduler, model runner and sampler in one step."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        *,
        kv_memory: torch.Tensor | None = None,
        store: StoreClient | None = None,
    ) -> None:
        """``kv_memory``: flat uint8 memory for the KV cache (a transfer segment, so peers can
        write pages into it); ``store``: share full KV blocks with other instances."""
        self.config = config = config or EngineConfig()
        device = torch.device(config.device)
        dtype = _DTYPES[config.dtype]
        model = loaded.model
        if model.device != device or model.dtype != dtype:
            model = model.to(device, dtype)
        self.loaded = loaded
        self.model = model
        self.tokenizer = loaded.tokenizer
        mc = model.config
        num_blocks, _ = kv_cache_size(loaded, config)
        self.num_blocks = num_blocks
        self.max_model_len = min(
            config.max_model_len or mc.context_length,
            mc.context_length,
            num_blocks * config.block_size,
        )
        self.cache = PagedKVCache.allocate(
            num_layers=mc.num_layers,
            num_blocks=num_blocks,
            block_size=config.block_size,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=dtype,
            device=device,
            memory=kv_memory,
        )
        self.attention = make_attention_backend(config.attention_backend, self.cache)
        self.pool = BlockPool(num_blocks)
        self.store = StorePrefixCache(store, self.cache) if store is not None else None
        self.scheduler = Scheduler(
            self.pool,
            block_size=config.block_size,
            root_hash=root_hash(model.fingerprint + f"|block{config.block_size}"),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            store=self.store,
        )
        self.device = device
        self._requests: dict[str, Request] = {}
        self._held: dict[str, Request] = {}  # finished prefills whose blocks a handoff reads
        self.last_step: StepTiming | None = None
        self.stalled = False  # the last step could not run: blocks are held by handoffs
        logger.info(
            "engine ready: %s on %s/%s, %d blocks of %d tokens, max_model_len %d, attention %s",
            loaded.name,
            device,
            config.dtype,
            num_blocks,
            config.block_size,
            self.max_model_len,
            self.attention.name,
        )

    # ---- requests ----------------------------------------------------------------------------

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidRequest/PromptTooLong for a request this engine cannot run."""
        if not prompt_token_ids:
            raise InvalidRequest("prompt", "must not be empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(
                "prompt", f"token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}"
            )
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(len(prompt_token_ids), params.max_tokens, self.max_model_len)

    def _new_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Request:
        if request_id in self._requests or request_id in self._held:
            raise InvalidRequest("request_id", f"request {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        return Request(
            request_id,
            list(prompt_token_ids),
            params,
            eos_token_id=self.tokenizer.eos_token_id,
            device=self.device,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        hold_blocks: bool = False,
    ) -> None:
        """Queue a request; raises InvalidRequest (or PromptTooLong) before queueing anything.

        ``hold_blocks``: when it finishes, keep its blocks (listed in the last output's
        ``held_block_ids``) until ``release_held``: a prefill whose KV a handoff still reads.
        """
        request = self._new_request(request_id, prompt_token_ids, params)
        request.hold_blocks = hold_blocks
        self._requests[request_id] = request
        self.scheduler.add(request)

    def reserve(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[int] | None:
        """Decode side of a PD handoff: hold blocks for the prompt's KV, which a prefill worker
        then writes; None while too few blocks are free (try again after a step).
        ``activate`` starts decoding; ``abort`` gives the blocks back.
        """
        request = self._new_request(request_id, prompt_token_ids, params)
        if not self.scheduler.reserve(request):
            return None
        self._requests[request_id] = request
        return list(request.block_ids)

    def activate(self, request_id: str, first_token: int) -> RequestOutput:
        """The reserved request's prompt KV has landed and the prefill sampled ``first_token``:
        emit it and decode from here. Raises InvalidRequest for an unknown request."""
        request = self._requests.get(request_id)
        if request is None or request.status is not RequestStatus.TRANSFERRING:
            raise InvalidRequest("request_id", f"request {request_id!r} is not reserved")
        vocab = self.model.config.vocab_size
        if not 0 <= first_token < vocab:
            self.abort(request_id)
            raise InvalidRequest("first_token", f"{first_token} is outside 0..{vocab - 1}")
        if request.generator is not None:
            # The prefill worker drew the first token from the same seed: spend that draw here
            # too, so a seeded request samples the same tokens as it would colocated.
            probs = torch.ones(vocab, device=self.device)
            torch.multinomial(probs, 1, generator=request.generator)
        self.scheduler.activate(request)
        return self._append_token(request, first_token, time.monotonic())

    def release_held(self, request_id: str) -> bool:
        """Free the blocks a finished ``hold_blocks`` request kept; False if none are held."""
        request = self._held.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.release_held(request)
        return True

    def abort(self, request_id: str) -> bool:
        """Drop a request (or its held blocks) and free its blocks; False when not here."""
        if self.release_held(request_id):
            return True
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request)
        logger.debug("aborted request %s", request_id)
        return True

    def request_ids(self) -> list[str]:
        """Ids of the requests waiting, running or transferring, and of held prefills."""
        return [*self._requests, *self._held]

    def has_unfinished(self) -> bool:
        """True while any request waits or runs (transferring and held ones do not run)."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    def stats(self) -> EngineStats:
        """Counts for metrics."""
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            kv=self.pool.stats(),
            num_transferring=len(self._requests)
            - len(self.scheduler.running)
            - len(self.scheduler.waiting),
            num_held=len(self._held),
            store_hit_tokens=self.scheduler.store_hit_tokens,
            store=self.store.stats() if self.store is not None else None,
        )

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample; returns what each sampled request produced."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        self.stalled = False
        if not batch.items:
            if self.scheduler.waiting and not self.scheduler.running:
                handoffs = self._held or len(self._requests) > len(self.scheduler.waiting)
                if not handoffs:
                    raise EngineError("scheduler made no progress with requests waiting")
                # The free blocks are held by handoffs (reserved or held prefills): only their
                # end (an activate, abort or release command) can unblock the queue.
                self.stalled = True
            return []
        bs = self.config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        samplers: list[Request] = []
        for request, num_new in batch.items:
            start = request.num_computed_tokens
            all_ids = request.all_token_ids
            tokens.extend(all_ids[start : start + num_new])
            for pos in range(start, start + num_new):
                positions.append(pos)
                slots.append(request.block_ids[pos // bs] * bs + pos % bs)
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(start + num_new)
            if start + num_new == request.num_tokens:
                sample_rows.append(query_start[-1] - 1)
                samplers.append(request)
        device = self.device
        layout = BatchLayout(
            query_start=query_start,
            seq_lens=seq_lens,
            block_tables=[r.block_ids for r, _ in batch.items],
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        )
        self.attention.begin(layout)
        logits = self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            self.attention,
            logits_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        )
        for request, num_new in batch.items:
            request.num_computed_tokens += num_new
            self.scheduler.commit(request)
        outputs = []
        greedy = logits.argmax(dim=-1).tolist()
        now = time.monotonic()
        for row, request in enumerate(samplers):
            if request.params.greedy:
                token = greedy[row]
            else:
                token = sample_next(logits[row], request.params, request.generator)
            outputs.append(self._append_token(request, token, now))
        self.last_step = StepTiming(
            num_tokens=batch.num_tokens,
            num_seqs=len(batch.items),
            duration_s=time.perf_counter() - started,
        )
        return outputs

    def _append_token(self, request: Request, token: int, now: float) -> RequestOutput:
        request.output_token_ids.append(token)
        request.last_token_s = now
        params = request.params
        reason: FinishReason | None = None
        text_ids = request.output_token_ids
        if token in request.stop_token_ids:
            reason = FinishReason.STOP
            text_ids = text_ids[:-1]
        elif (
            len(request.output_token_ids) >= params.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        text = self.tokenizer.decode(text_ids)
        if params.stop:
            # search only where a new match can start: near the end of the previous text
            window = max(0, len(request.output_text) - max(len(s) for s in params.stop))
            hits = [i for s in params.stop if (i := text.find(s, window)) >= 0]
            if hits:
                text = text[: min(hits)]
                reason = FinishReason.STOP
        request.output_text = text
        # Hold back text that may still change: a cut UTF-8 sequence, or a possible stop prefix.
        ready = len(text)
        if reason is None:
            if text.endswith("\ufffd"):
                ready = len(text.rstrip("\ufffd"))
            if params.stop:
                ready = min(ready, max(0, len(text) - max(len(s) for s in params.stop) + 1))
        ready = max(ready, request.num_sent_chars)
        delta = text[request.num_sent_chars : ready]
        request.num_sent_chars = ready
        held: tuple[int, ...] = ()
        if reason is not None:
            request.finish_reason = reason
            self._requests.pop(request.request_id, None)
            self.scheduler.finish(request, hold=request.hold_blocks)
            if request.hold_blocks:
                self._held[request.request_id] = request
                held = tuple(request.block_ids)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=(token,),
            text=delta,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=len(request.output_token_ids),
            cached_tokens=request.num_cached_tokens,
            store_cached_tokens=request.num_store_cached_tokens,
            held_block_ids=held,
        )

    # ---- offline use -------------------------------------------------------------------------

    def generate(
        self, prompts: Iterable[Sequence[int]], params: SamplingParams, *, max_steps: int = 100_000
    ) -> list[list[int]]:
        """Run prompts to completion together; output token ids per prompt, in order."""
        ids = []
        for index, prompt in enumerate(prompts):
            request_id = f"generate-{index}-{time.monotonic_ns()}"
            self.add_request(request_id, prompt, params)
            ids.append(request_id)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        for _ in range(max_steps):
            if not any(rid in self._requests for rid in ids):
                break
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        else:
            raise EngineError(f"generate() did not finish within {max_steps} steps")
        return [results[rid] for rid in ids]

    def close(self) -> None:
        """Write queued store saves and stop the store writer."""
        if self.store is not None:
            self.store.close()

    def running_request(self, request_id: str) -> Request | None:
        """The live request, for tests and metrics; None once finished."""
        request = self._requests.get(request_id)
        return request if request and request.status is not RequestStatus.FINISHED else None
