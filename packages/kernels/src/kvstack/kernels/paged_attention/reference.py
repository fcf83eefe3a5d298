"""PyTorch reference of paged attention: what ``paged_attention`` computes, in float32/float64."""

from __future__ import annotations

import math

import torch

__all__ = ["paged_attention_reference"]


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context, in ``dtype``.

    ``query``: ``[num_tokens, num_q_heads, head_size]``, sequence s owning rows
    ``query_start[s]:query_start[s + 1]``; caches: ``[num_blocks, block_size, num_kv_heads,
    head_size]``; ``block_table[s, i]``: the block holding tokens ``i * block_size ..`` of
    sequence s, whose ``seq_lens[s]`` tokens end with its new ones. Query head h reads KV head
    ``h // (num_q_heads // num_kv_heads)``. A query at absolute position p sees keys ``j <= p``,
    and with ``sliding_window=W`` only ``p - j < W``; ``soft_cap=c`` maps each scaled score x to
    ``c * tanh(x / c)`` before the softmax. Returns ``[num_tokens, num_q_heads, head_size]``
    in ``dtype``.
    """
    num_tokens, num_q_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    q_per_kv = num_q_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_size)
    out = torch.empty(num_tokens, num_q_heads, head_size, dtype=dtype, device=query.device)
    starts = query_start.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_lo, q_hi = starts[seq], starts[seq + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        num_pages = -(-seq_len // block_size)
        pages = block_table[seq, :num_pages].long()
        # [seq_len, num_kv_heads, head_size], then one KV head per query head
        keys = key_cache[pages].reshape(-1, num_kv_heads, head_size)[:seq_len].to(dtype)
        values = value_cache[pages].reshape(-1, num_kv_heads, head_size)[:seq_len].to(dtype)
        keys = keys.repeat_interleave(q_per_kv, dim=1)
        values = values.repeat_interleave(q_per_kv, dim=1)
        q = query[q_lo:q_hi].to(dtype)
        # [heads, q_len, seq_len]
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        query_abs = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = key_pos <= query_abs
        if sliding_window is not None:
            allowed &= query_abs - key_pos < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", weights, values)
    return out
