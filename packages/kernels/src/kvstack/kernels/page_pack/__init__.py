"""Page pack/unpack: move a request's KV pages, all layers at once, to and from one buffer.

The buffer is what the transfer engine ships between nodes: ``[num_layers, num_pages, *page]``,
contiguous. One launch moves every layer of the request; the copy moves bits, so a pack followed
by an unpack is bit-exact for every dtype.
"""

from __future__ import annotations

import math

import torch

from kvstack.kernels._checks import (
    INDEX_DTYPES,
    check_dtype,
    check_inner_contiguous,
    check_ndim,
    check_same_device,
    dtype_name,
    shape_of,
)
from kvstack.kernels._launch import launch
from kvstack.kernels.errors import BadDtype, BadLayout, BadShape
from kvstack.kernels.page_pack._heuristics import (
    TILE_BYTES,
    PageCopyConfig,
    page_copy_config,
    word_bytes,
)
from kvstack.kernels.page_pack._kernel import page_copy_kernel
from kvstack.kernels.page_pack.reference import pack_pages_reference, unpack_pages_reference

__all__ = [
    "PageCopyConfig",
    "pack_pages",
    "pack_pages_reference",
    "page_copy_config",
    "unpack_pages",
    "unpack_pages_reference",
]

_CACHE_LAYOUT = "[num_layers, num_blocks, *page] (at least 3 dimensions)"
_WORD_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_cache_and_ids(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    if kv_cache.dim() < 3:
        raise BadShape("kv_cache", f"has shape {shape_of(kv_cache)}; expected {_CACHE_LAYOUT}")
    check_inner_contiguous("kv_cache", kv_cache, 2)
    check_ndim("block_ids", block_ids, 1, "[num_pages]")
    check_dtype("block_ids", block_ids, INDEX_DTYPES)
    if block_ids.stride(0) != 1 and block_ids.numel() > 1:
        raise BadLayout("block_ids", f"has stride {block_ids.stride(0)}; must be contiguous")


def _words(tensor: torch.Tensor, word: int) -> torch.Tensor:
    """``[a, b, *page]`` viewed as ``[a, b, page_words]`` integers of ``word`` bytes."""
    flat = tensor.flatten(2)
    return flat.view(torch.uint8).view(_WORD_DTYPES[word])


def _copy(
    kv_cache: torch.Tensor,
    buffer: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    unpack: bool,
    tile_bytes: int = TILE_BYTES,
    num_warps: int | None = None,
) -> None:
    """The one launch behind pack and unpack; ``tile_bytes``/``num_warps`` are tuning overrides."""
    num_layers = kv_cache.shape[0]
    num_pages = block_ids.shape[0]
    if num_layers == 0 or num_pages == 0:
        return
    elem = kv_cache.element_size()
    page_bytes = math.prod(kv_cache.shape[2:]) * elem
    if page_bytes == 0:
        return
    word = word_bytes(
        page_bytes,
        (kv_cache.stride(0) * elem, kv_cache.stride(1) * elem),
        int(kv_cache.storage_offset()) * elem,
    )
    cache_words = _words(kv_cache, word)
    buffer_words = _words(buffer, word)
    page_words = page_bytes // word
    config = page_copy_config(page_words, word, tile_bytes=tile_bytes, num_warps=num_warps)
    grid = (num_pages * config.tiles_per_page, num_layers)
    launch(page_copy_kernel, grid, kv_cache.device)(
        cache_ptr=cache_words,
        buffer_ptr=buffer_words,
        block_ids_ptr=block_ids,
        stride_cache_layer=cache_words.stride(0),
        stride_cache_block=cache_words.stride(1),
        num_pages=num_pages,
        PAGE_WORDS=page_words,
        TILES_PER_PAGE=config.tiles_per_page,
        TILE=config.tile,
        UNPACK=unpack,
        num_warps=config.num_warps,
    )


def pack_pages(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gather pages ``block_ids`` of every layer into ``[num_layers, num_pages, *page]``.

    ``kv_cache``: ``[num_layers, num_blocks, *page]``, each page contiguous (the layer and block
    strides are free), any dtype. ``block_ids``: ``[num_pages]`` int32/int64 on the cache's
    device; ids are not range-checked (that would cost a device sync). ``out``: a contiguous
    buffer of that shape and the cache's dtype, allocated when not given. One launch.

    Raises BadShape, BadDtype, BadDevice or BadLayout naming the offending tensor.
    """
    _check_cache_and_ids(kv_cache, block_ids)
    shape = (kv_cache.shape[0], block_ids.shape[0], *kv_cache.shape[2:])
    if out is None:
        check_same_device({"kv_cache": kv_cache, "block_ids": block_ids})
        out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    else:
        _check_buffer("out", out, kv_cache, shape)
        check_same_device({"kv_cache": kv_cache, "block_ids": block_ids, "out": out})
    _copy(kv_cache, out, block_ids, unpack=False)
    return out


def unpack_pages(buffer: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Scatter ``buffer[:, p]`` into block ``block_ids[p]`` of each layer of ``kv_cache``, in place.

    ``buffer``: ``[num_layers, num_pages, *page]`` as ``pack_pages`` returns it; the other
    arguments as for ``pack_pages``. Repeated block ids leave which copy wins undefined. One launch.

    Raises BadShape, BadDtype, BadDevice or BadLayout naming the offending tensor.
    """
    _check_cache_and_ids(kv_cache, block_ids)
    shape = (kv_cache.shape[0], block_ids.shape[0], *kv_cache.shape[2:])
    _check_buffer("buffer", buffer, kv_cache, shape)
    check_same_device({"buffer": buffer, "kv_cache": kv_cache, "block_ids": block_ids})
    _copy(kv_cache, buffer, block_ids, unpack=True)


def _check_buffer(
    name: str, buffer: torch.Tensor, kv_cache: torch.Tensor, shape: tuple[int, ...]
) -> None:
    if tuple(buffer.shape) != shape:
        expected = "[" + ", ".join(str(s) for s in shape) + "]"
        raise BadShape(
            name,
            f"has shape {shape_of(buffer)}; expected {expected} "
            "([num_layers, num_pages, *page] of kv_cache and block_ids)",
        )
    if buffer.dtype != kv_cache.dtype:
        raise BadDtype(
            name,
            f"has dtype {dtype_name(buffer.dtype)} but kv_cache has {dtype_name(kv_cache.dtype)}",
        )
    if not buffer.is_contiguous():
        raise BadLayout(
            name,
            f"has shape {shape_of(buffer)} and strides {list(buffer.stride())}; must be contiguous",
        )
