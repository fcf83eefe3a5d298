"""A request's state inside the engine: tokens, KV blocks, progress, detokenization."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from kvstack.serve._sampling import SamplingParams

__all__ = ["FinishReason", "Request", "RequestOutput", "RequestStatus"]


class RequestStatus(enum.Enum):
    """Where a request is in the scheduler."""

    WAITING = "waiting"
    RUNNING = "running"
    # Decode side of a PD handoff: blocks held, a prefill worker writing the prompt's KV.
    TRANSFERRING = "transferring"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    """OpenAI's ``finish_reason`` values (wire strings)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step produced for one request; ``text`` is only the new text."""

    request_id: str
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    store_cached_tokens: int = 0  # of cached_tokens, those read from the store
    # Prefill side of a PD handoff: the finished request's blocks, held until released.
    held_block_ids: tuple[int, ...] = ()


class Request:
    """Mutable engine-side state of one request (owned by the engine thread)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        eos_token_id: int | None,
        device: torch.device,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params
        self.stop_token_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_token_ids.add(eos_token_id)
        self.generator = params.generator(device)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # of the full blocks of all_token_ids, in order
        self.num_registered_blocks = 0  # leading blocks already in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.num_store_cached_tokens = 0  # of which read from the store (first schedule)
        self.hold_blocks = False  # keep the blocks after finishing (a prefill for a PD handoff)
        self.num_preemptions = 0
        self.arrival_s = time.monotonic()
        self.last_token_s: float | None = None
        # detokenization: text decoded so far and how much of it was handed out
        self.output_text = ""
        self.num_sent_chars = 0
        self.finish_reason: FinishReason | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)
