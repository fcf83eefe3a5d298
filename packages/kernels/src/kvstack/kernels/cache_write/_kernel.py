"""Triton kernel: scatter new tokens' K and V into cache pages by slot mapping."""

from __future__ import annotations

import triton
import triton.language as tl


# Triton binds kernel arguments by position and launchers pass them by keyword, so the long
# positional list is the kernel's calling convention.
@triton.jit
def cache_write_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping_ptr,  # [num_tokens], slot = block * block_size + offset, -1 = padding
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_key_cache_block,
    stride_value_cache_block,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,  # elements of one token's [num_kv_heads * head_size] row per program
):
    # int64 from here on: offsets of large caches pass 2**31 elements.
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        # Padding token (CUDA-graph batches are padded to a captured size): nothing to write.
        return
    block = slot // BLOCK_SIZE
    block_offset = slot % BLOCK_SIZE

    offs = tile * TILE + tl.arange(0, TILE)  # flattened (head, dim) index
    mask = offs < NUM_KV_HEADS * HEAD_SIZE
    head = offs // HEAD_SIZE
    dim = offs % HEAD_SIZE
    # A page row [num_kv_heads, head_size] is contiguous (the launcher checks it), so `offs`
    # addresses it directly.
    row = block_offset * (NUM_KV_HEADS * HEAD_SIZE) + offs

    k = tl.load(key_ptr + token * stride_key_token + head * stride_key_head + dim, mask=mask)
    tl.store(key_cache_ptr + block * stride_key_cache_block + row, k, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + head * stride_value_head + dim, mask=mask)
    tl.store(value_cache_ptr + block * stride_value_cache_block + row, v, mask=mask)
