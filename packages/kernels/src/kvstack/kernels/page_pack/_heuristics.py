"""Launch configuration of the page copy: pure functions of the page geometry."""

from __future__ import annotations

from typing import NamedTuple

from kvstack.kernels._launch import cdiv, next_power_of_2

__all__ = ["PageCopyConfig", "page_copy_config", "word_bytes"]

# Bytes one program moves: 16 KiB is 32 bytes per thread per access at 4 warps x 128 threads
# (two 16-byte vector loads in flight each), and a 64 KiB Llama-3.1-8B page (K+V, 16 tokens,
# 8 heads x 128, bf16) splits into 4 programs, so a 512 MiB request is 32768 programs: ~250
# per SM on an H100, enough to hide DRAM latency without a loop inside the program.
TILE_BYTES = 16384


class PageCopyConfig(NamedTuple):
    """Words per program, programs per page, warps."""

    tile: int
    tiles_per_page: int
    num_warps: int


def word_bytes(page_bytes: int, stride_bytes: tuple[int, ...], offset_bytes: int) -> int:
    """The widest integer word (8, 4, 2 or 1 bytes) that divides the page and every address.

    Moving 8-byte words lets the compiler issue 16-byte vector accesses when it can prove
    alignment; any dtype's bits move unchanged.
    """
    for width in (8, 4, 2):
        addresses = (page_bytes, offset_bytes, *stride_bytes)
        if all(value % width == 0 for value in addresses):
            return width
    return 1


def page_copy_config(page_words: int, word: int) -> PageCopyConfig:
    """Tile the page so each program moves up to ``TILE_BYTES``."""
    tile = min(next_power_of_2(page_words), max(TILE_BYTES // word, 1))
    num_warps = 4 if tile * word >= 4096 else 1
    return PageCopyConfig(tile=tile, tiles_per_page=cdiv(page_words, tile), num_warps=num_warps)
