"""PyTorch reference of the cache write: what ``write_kv_cache`` computes."""

from __future__ import annotations

import torch

__all__ = ["write_kv_cache_reference"]


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return copies of the caches with token ``t`` written at slot ``slot_mapping[t]``.

    ``key``/``value``: ``[num_tokens, num_kv_heads, head_size]``; caches: ``[num_blocks,
    block_size, num_kv_heads, head_size]``; a slot is ``block * block_size + offset`` and -1 marks
    a padding token, which is skipped. The inputs are not modified.
    """
    block_size = key_cache.shape[1]
    key_out = key_cache.clone()
    value_out = value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks = slots // block_size
    offsets = slots % block_size
    key_out[blocks, offsets] = key[keep].to(key_out.dtype)
    value_out[blocks, offsets] = value[keep].to(value_out.dtype)
    return key_out, value_out
