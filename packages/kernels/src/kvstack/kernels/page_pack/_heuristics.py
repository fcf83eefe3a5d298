"""Launch configuration of the page copy: pure functions of the page geometry."""

from __future__ import annotations

from typing import NamedTuple

from kvstack.kernels._launch import cdiv, next_power_of_2

__all__ = ["PageCopyConfig", "page_copy_config", "word_bytes"]

# Bytes one program moves: 4 KiB at 4 warps (one 16-byte vector per thread per access pass)
# makes a 64 KiB Llama-3.1-8B page (K+V, 16 tokens, 8 heads x 128, bf16) 16 programs, so a
# 512 MiB request is 131072 short programs that keep many loads in flight. Measured on an
# H200 (tune_sweep.py, GPU time): pack 512 MiB 270 us at 16 KiB -> 257 us at 4 KiB (0.98 of
# the device copy bandwidth); wider tiles and more warps were no better.
TILE_BYTES = 4096
# Warps of a program moving at least 4 KiB (benchmarks/tune_sweep.py sweeps it with TILE_BYTES).
TILE_WARPS = 4


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


def page_copy_config(
    page_words: int, word: int, *, tile_bytes: int = TILE_BYTES, num_warps: int | None = None
) -> PageCopyConfig:
    """Tile the page so each program moves up to ``tile_bytes`` (a power of two).

    ``tile_bytes`` and ``num_warps`` override the defaults for tuning (benchmarks/tune_sweep.py).
    """
    tile = min(next_power_of_2(page_words), max(tile_bytes // word, 1))
    if num_warps is None:
        num_warps = TILE_WARPS if tile * word >= 4096 else 1
    return PageCopyConfig(tile=tile, tiles_per_page=cdiv(page_words, tile), num_warps=num_warps)
