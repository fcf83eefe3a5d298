"""Launch configuration of the cache-write kernel: pure functions of the shapes."""

from __future__ import annotations

from typing import NamedTuple

from kvstack.kernels._launch import cdiv, next_power_of_2

__all__ = ["CacheWriteConfig", "cache_write_config"]

# One program writes at most this many elements of a token's row: 4096 two-byte elements is
# 8 KiB, 16 bytes per thread per access at 4 warps, and Llama-3.1-8B's row (8 heads x 128 =
# 1024 elements) fits in a single program.
MAX_TILE = 4096


class CacheWriteConfig(NamedTuple):
    """Tile (elements of one token row per program), programs along the row, warps."""

    tile: int
    tiles_per_token: int
    num_warps: int


def cache_write_config(num_kv_heads: int, head_size: int) -> CacheWriteConfig:
    """Pick the tile so one token's ``[num_kv_heads, head_size]`` row takes few programs."""
    row = num_kv_heads * head_size
    tile = min(next_power_of_2(row), MAX_TILE)
    # Fewer warps for short rows: below 1024 elements extra warps would only idle on the mask.
    num_warps = 4 if tile >= 1024 else 2
    return CacheWriteConfig(tile=tile, tiles_per_token=cdiv(row, tile), num_warps=num_warps)
