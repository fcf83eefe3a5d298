"""A Llama-architecture decoder in PyTorch: weights, the dense reference forward, the paged forward.

Weights follow GGUF's layout: Q and K rows are permuted so RoPE rotates adjacent pairs
``(2i, 2i + 1)`` (GGML's "normal" RoPE), not the halves HF's ``rotate_half`` pairs. The random
tiny model uses the same convention, so one forward serves both.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvstack.serve.errors import ModelError

__all__ = [
    "AttentionFn",
    "LayerWeights",
    "LlamaModel",
    "ModelConfig",
    "random_tiny_model",
]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-architecture model; ``context_length`` in tokens."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float
    rms_eps: float
    context_length: int

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "context_length",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ModelError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"ModelConfig.num_heads={self.num_heads} is no multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer; matrices are ``[out_features, in_features]`` float32."""

    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden], Q/K rows GGUF-permuted
    wo: torch.Tensor  # [hidden, heads * head_dim]
    ffn_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]
    w_down: torch.Tensor  # [hidden, intermediate]


# attention(layer, query [T, heads, dim], key [T, kv_heads, dim], value) -> [T, heads, dim]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlamaModel:
    """The decoder. ``forward`` runs any token layout; attention is supplied by the caller."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        source: str,
    ) -> None:
        if len(layers) != config.num_layers:
            raise ModelError(
                f"{source}: {len(layers)} layers given, config says {config.num_layers}"
            )
        if tuple(embed.shape) != (config.vocab_size, config.hidden_size):
            raise ModelError(
                f"{source}: embedding has shape {tuple(embed.shape)}, expected "
                f"{(config.vocab_size, config.hidden_size)}"
            )
        self.config = config
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head  # [vocab, hidden], tied to embed for SmolLM2
        self.source = source
        self.dtype = embed.dtype
        self.device = embed.device
        half = config.head_dim // 2
        inv_freq = 1.0 / (
            config.rope_base ** (torch.arange(half, dtype=torch.float64) * 2 / config.head_dim)
        )
        angles = torch.outer(torch.arange(config.context_length, dtype=torch.float64), inv_freq)
        # [context_length, head_dim / 2], computed in float64 so long positions stay exact
        self._cos = angles.cos().to(self.dtype).to(self.device)
        self._sin = angles.sin().to(self.dtype).to(self.device)

    @property
    def fingerprint(self) -> str:
        """Identity of the weights and layout, mixed into every KV block hash."""
        c = self.config
        text = (
            f"{self.source}|{c.num_layers}x{c.num_kv_heads}x{c.head_dim}|"
            f"{str(self.dtype).removeprefix('torch.')}"
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LlamaModel:
        """A copy of the weights on ``device`` (and in ``dtype`` when given)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        layers = [
            LayerWeights(
                attn_norm=move(w.attn_norm),
                wqkv=move(w.wqkv),
                wo=move(w.wo),
                ffn_norm=move(w.ffn_norm),
                w_gate_up=move(w.w_gate_up),
                w_down=move(w.w_down),
            )
            for w in self.layers
        ]
        head = self.lm_head
        return LlamaModel(
            self.config,
            embed=move(self.embed),
            layers=layers,
            final_norm=move(self.final_norm),
            lm_head=move(self.embed) if head is self.embed else move(head),
            source=self.source,
        )

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.config.rms_eps)).to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]; GGML "normal" RoPE rotates adjacent pairs (2i, 2i + 1)
        cos = self._cos[positions][:, None, :]  # [T, 1, head_dim / 2]
        sin = self._sin[positions][:, None, :]
        pairs = x.unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        *,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(logits_rows), vocab]`` (float32) for the chosen rows of a token batch.

        ``token_ids``, ``positions``: ``[T]`` int64 on the model's device; ``attention`` maps
        one layer's Q/K/V to its output and owns any cache. ``logits_rows`` defaults to all rows.
        """
        c = self.config
        q_size = c.num_heads * c.head_dim
        kv_size = c.num_kv_heads * c.head_dim
        h = self.embed[token_ids]  # [T, hidden]
        for index, w in enumerate(self.layers):
            x = self._rms_norm(h, w.attn_norm)
            qkv = x @ w.wqkv.T  # [T, q_size + 2 * kv_size]
            q = qkv[:, :q_size].unflatten(-1, (c.num_heads, c.head_dim))
            k = qkv[:, q_size : q_size + kv_size].unflatten(-1, (c.num_kv_heads, c.head_dim))
            v = qkv[:, q_size + kv_size :].unflatten(-1, (c.num_kv_heads, c.head_dim))
            q = self._rope(q, positions)
            k = self._rope(k, positions)
            out = attention(index, q, k, v.contiguous())  # [T, heads, head_dim]
            h = h + out.flatten(-2) @ w.wo.T
            x = self._rms_norm(h, w.ffn_norm)
            gate, up = (x @ w.w_gate_up.T).chunk(2, dim=-1)
            h = h + (F.silu(gate) * up) @ w.w_down.T
        if logits_rows is not None:
            h = h[logits_rows]
        h = self._rms_norm(h, self.final_norm)
        return (h @ self.lm_head.T).float()

    def dense_logits(self, token_ids: list[int]) -> torch.Tensor:
        """The reference: one sequence, no cache, no paging, no batching; ``[T, vocab]``."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)
        scale = 1.0 / math.sqrt(self.config.head_dim)

        def causal(_layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
            )
            return out.transpose(0, 1)

        return self.forward(ids, positions, causal)

    def dense_greedy(
        self, prompt: list[int], max_tokens: int, *, stop_ids: frozenset[int]
    ) -> list[int]:
        """Greedy continuation by re-running the dense forward each step (the reference)."""
        tokens = list(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(self.dense_logits(tokens)[-1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            tokens.append(token)
        return out


def random_tiny_model(
    *,
    vocab_size: int,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    context_length: int = 1024,
    seed: int = 0,
) -> LlamaModel:
    """A seeded random-weight Llama for fast tests; same seed and sizes, same weights."""
    head_dim = hidden_size // num_heads
    config = ModelConfig(
        name="tiny",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_base=10000.0,
        rms_eps=1e-5,
        context_length=context_length,
    )
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim
    layers = [
        LayerWeights(
            attn_norm=1.0 + rand(hidden_size, scale=0.1),
            wqkv=rand(qkv_rows, hidden_size, scale=2.0 / math.sqrt(hidden_size)),
            wo=rand(hidden_size, num_heads * head_dim, scale=1.0 / math.sqrt(hidden_size)),
            ffn_norm=1.0 + rand(hidden_size, scale=0.1),
            w_gate_up=rand(2 * intermediate_size, hidden_size, scale=1.0 / math.sqrt(hidden_size)),
            w_down=rand(hidden_size, intermediate_size, scale=1.0 / math.sqrt(intermediate_size)),
        )
        for _ in range(num_layers)
    ]
    # An untied head of unit scale: logits spread widely (std ~ sqrt(hidden)), so greedy choices
    # sit far from ties and the paged-vs-dense tests compare decisions, not float rounding. (A
    # tied head makes a random model repeat its input token forever, which tests nothing.)
    return LlamaModel(
        config,
        embed=rand(vocab_size, hidden_size, scale=1.0),
        layers=layers,
        final_norm=torch.ones(hidden_size),
        lm_head=rand(vocab_size, hidden_size, scale=1.0),
        source=f"tiny-seed{seed}-v{vocab_size}-h{hidden_size}-l{num_layers}",
    )
