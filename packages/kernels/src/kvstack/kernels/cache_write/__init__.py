"""Cache write: scatter new tokens' K and V into the paged KV cache by slot mapping."""

from __future__ import annotations

import torch

from kvstack.kernels._checks import (
    INDEX_DTYPES,
    bits_view,
    check_dtype,
    check_inner_contiguous,
    check_ndim,
    check_same_device,
    check_size,
    dtype_name,
    shape_of,
)
from kvstack.kernels._launch import launch
from kvstack.kernels.cache_write._heuristics import CacheWriteConfig, cache_write_config
from kvstack.kernels.cache_write._kernel import cache_write_kernel
from kvstack.kernels.cache_write.reference import write_kv_cache_reference
from kvstack.kernels.errors import BadDtype, BadLayout

__all__ = ["CacheWriteConfig", "cache_write_config", "write_kv_cache", "write_kv_cache_reference"]

_TOKENS_LAYOUT = "[num_tokens, num_kv_heads, head_size]"
_CACHE_LAYOUT = "[num_blocks, block_size, num_kv_heads, head_size]"


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token ``t`` of ``key``/``value`` into the caches at slot ``slot_mapping[t]``, in place.

    ``key``, ``value``: ``[num_tokens, num_kv_heads, head_size]`` (the last dimension contiguous;
    slices of a fused QKV projection are fine). ``key_cache``, ``value_cache``: ``[num_blocks,
    block_size, num_kv_heads, head_size]``, each page contiguous (the block stride is free, so K/V
    views of one interleaved cache work). ``slot_mapping``: ``[num_tokens]`` int32/int64, slot =
    ``block * block_size + offset``; -1 marks a padding token and is skipped. Slots are not
    range-checked (that would cost a device sync). Any dtype, as long as tokens and caches agree:
    bits are copied unchanged.

    Raises BadShape, BadDtype, BadDevice or BadLayout naming the offending tensor.
    """
    check_ndim("key", key, 3, _TOKENS_LAYOUT)
    check_ndim("value", value, 3, _TOKENS_LAYOUT)
    check_ndim("key_cache", key_cache, 4, _CACHE_LAYOUT)
    check_ndim("value_cache", value_cache, 4, _CACHE_LAYOUT)
    check_ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    num_tokens, num_kv_heads, head_size = key.shape
    for dim, size, what in (
        (0, num_tokens, "num_tokens of key"),
        (1, num_kv_heads, "num_kv_heads of key"),
        (2, head_size, "head_size of key"),
    ):
        check_size("value", value, dim, size, what)
    for dim, size, what in (
        (2, num_kv_heads, "num_kv_heads of key"),
        (3, head_size, "head_size of key"),
    ):
        check_size("key_cache", key_cache, dim, size, what)
    for dim in range(4):
        check_size("value_cache", value_cache, dim, key_cache.shape[dim], "shape of key_cache")
    check_size("slot_mapping", slot_mapping, 0, num_tokens, "num_tokens of key")
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    for name, tensor in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.dtype != key.dtype:
            raise BadDtype(
                name,
                f"has dtype {dtype_name(tensor.dtype)} but key has {dtype_name(key.dtype)} "
                "(the cache write copies bits; convert or quantise before writing)",
            )
    for name, tensor in (("key", key), ("value", value)):
        if tensor.stride(2) != 1 and head_size != 1:
            raise BadLayout(
                name,
                f"has shape {shape_of(tensor)} and strides {list(tensor.stride())}; "
                "the head_size dimension must be contiguous",
            )
    check_inner_contiguous("key_cache", key_cache, 1)
    check_inner_contiguous("value_cache", value_cache, 1)
    check_same_device(
        {
            "key": key,
            "value": value,
            "key_cache": key_cache,
            "value_cache": value_cache,
            "slot_mapping": slot_mapping,
        }
    )
    if num_tokens == 0:
        return

    config = cache_write_config(num_kv_heads, head_size)
    grid = (num_tokens, config.tiles_per_token)
    launch(cache_write_kernel, grid, key.device)(
        key_ptr=bits_view(key),
        value_ptr=bits_view(value),
        key_cache_ptr=bits_view(key_cache),
        value_cache_ptr=bits_view(value_cache),
        slot_mapping_ptr=slot_mapping,
        stride_key_token=key.stride(0),
        stride_key_head=key.stride(1),
        stride_value_token=value.stride(0),
        stride_value_head=value.stride(1),
        stride_key_cache_block=key_cache.stride(0),
        stride_value_cache_block=value_cache.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        BLOCK_SIZE=key_cache.shape[1],
        TILE=config.tile,
        num_warps=config.num_warps,
    )
