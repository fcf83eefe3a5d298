"""Triton kernel: copy a request's pages, all layers, between the paged cache and one buffer."""

from __future__ import annotations

import triton
import triton.language as tl


# Triton binds kernel arguments by position and launchers pass them by keyword, so the long
# positional list is the kernel's calling convention.
@triton.jit
def page_copy_kernel(
    cache_ptr,  # [num_layers, num_blocks, page_words], page contiguous, outer strides free
    buffer_ptr,  # [num_layers, num_pages, page_words], contiguous
    block_ids_ptr,  # [num_pages]: the request's blocks, in buffer order
    stride_cache_layer,
    stride_cache_block,
    num_pages,
    PAGE_WORDS: tl.constexpr,  # words (1-8 byte integers) per page
    TILES_PER_PAGE: tl.constexpr,
    TILE: tl.constexpr,  # words per program
    UNPACK: tl.constexpr,  # False: cache -> buffer (pack); True: buffer -> cache (unpack)
):
    # Axis 0 walks pages and tiles within a page (it may exceed 65535); axis 1 is the layer.
    pid = tl.program_id(0)
    page = pid // TILES_PER_PAGE
    tile = pid % TILES_PER_PAGE
    # int64: a 512 MiB buffer already holds 2**28 two-byte words, and caches are larger.
    layer = tl.program_id(1).to(tl.int64)
    block = tl.load(block_ids_ptr + page).to(tl.int64)

    offs = tile * TILE + tl.arange(0, TILE)
    mask = offs < PAGE_WORDS
    cache_offs = layer * stride_cache_layer + block * stride_cache_block + offs
    buffer_offs = (layer * num_pages + page) * PAGE_WORDS + offs
    if UNPACK:
        words = tl.load(buffer_ptr + buffer_offs, mask=mask)
        tl.store(cache_ptr + cache_offs, words, mask=mask)
    else:
        words = tl.load(cache_ptr + cache_offs, mask=mask)
        tl.store(buffer_ptr + buffer_offs, words, mask=mask)
