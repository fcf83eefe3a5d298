"""Sampling parameters and the sampler: greedy, temperature, top-p, per-request seeds."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from kvstack.serve.errors import InvalidRequest

__all__ = ["SamplingParams", "sample_next"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and stops. ``temperature=0`` is greedy (the default)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(
                "max_tokens", f"must be a positive integer, got {self.max_tokens!r}"
            )
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest("temperature", f"must be in [0, 2], got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"must be in [0, 2**63), got {self.seed!r}")
        if any(not s for s in self.stop) or len(self.stop) > 4:
            raise InvalidRequest(
                "stop", f"must be up to 4 non-empty strings, got {list(self.stop)!r}"
            )

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax."""
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded from ``seed`` (or fresh entropy); None for greedy."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token from ``logits [vocab]`` (float32)."""
    if params.greedy or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
