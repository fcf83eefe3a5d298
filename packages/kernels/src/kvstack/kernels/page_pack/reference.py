"""PyTorch reference of page pack/unpack: what ``pack_pages``/``unpack_pages`` compute."""

from __future__ import annotations

import torch

__all__ = ["pack_pages_reference", "unpack_pages_reference"]


def pack_pages_reference(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``[num_layers, num_pages, *page]``: page ``block_ids[p]`` of every layer, in order.

    ``kv_cache``: ``[num_layers, num_blocks, *page]``.
    """
    return kv_cache[:, block_ids.long()].contiguous()


def unpack_pages_reference(
    buffer: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor
) -> torch.Tensor:
    """A copy of ``kv_cache`` with ``buffer[:, p]`` written to block ``block_ids[p]``."""
    out = kv_cache.clone()
    out[:, block_ids.long()] = buffer
    return out
