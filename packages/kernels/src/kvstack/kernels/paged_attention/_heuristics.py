"""Launch configuration of paged attention: pure functions of shapes, dtype and the device.

Two paths share one kernel:

* 2D (``num_segments == 1``): a program per (query block, KV head) walks the whole causal
  prefix of its tokens and writes the output.
* Split-KV (``num_segments > 1``): each (query block, KV head) is split into segments of its
  prefix, each program writes an unnormalised partial result with its running max and sum,
  and ``reduce_segments_kernel`` combines them. Worth it only when the 2D grid cannot fill the
  device: decode (one new token per sequence) of few sequences over long contexts.
"""

from __future__ import annotations

from typing import NamedTuple

from kvstack.kernels._launch import cdiv, next_power_of_2

__all__ = [
    "MAX_SEGMENTS",
    "MIN_SEGMENT_TOKENS",
    "SEGMENT_LIMIT",
    "AttentionConfig",
    "attention_config",
    "choose_num_segments",
]

# Upper bound on split-KV segments: 64 keeps the reduction one small tile per (token, head)
# and is enough to fill 132 SMs from a single sequence with 8 KV heads (8 x 64 = 512 programs).
MAX_SEGMENTS = 64
# Most segments a forced split (``num_segments`` or a config) may ask for: the reduction combines
# them in chunks of REDUCE_CHUNK, so the limit is memory for the partial results, not registers.
SEGMENT_LIMIT = 256
# Segments the reduction combines per step: a (32, 128) fp32 tile is 32 registers a thread
# at 4 warps.
REDUCE_CHUNK = 32
# A segment shorter than this spends more on its prologue (Q load, block-table lookups) and on
# the reduction's extra traffic (HEAD_SIZE fp32 per segment and head) than it gains: at 512
# keys x 128 dims x 2 bytes x 2 (K, V) it streams 256 KiB, vs 512 B written for the reduction.
MIN_SEGMENT_TOKENS = 512
# Waves of programs the split aims for: with one wave the slowest SM sets the time; two leave
# the tail at most half a wave.
TARGET_WAVES = 2

# Launch switches measured by benchmarks/tune_sweep.py on an H200 (2026-11-27, GPU time from
# CUDA graph replays, RESULTS.md): decode b64x4096 T64 255 us -> T32 k_by_key+prefetch 252 us
# (T64 with prefetch: 300 us, so the 2D decode tile drops to 32); split b1x32K S32 T64 50 ->
# 39 us with k_by_key+prefetch; prefill 4x4K 2290 -> 1568 us with k_by_key+prefetch+
# unmasked_prefix at 3 stages (SDPA flash: 1667-1733 us).
# Key tile of decode batches (max_query_len == 1) with head size <= 128, 2D and split-KV paths.
DECODE_TILE = 32
SPLIT_TILE = 64
# Pipeline depth of decode tiles (block_m < 128; short prefill chunks keep 3).
DECODE_STAGES = 3
# AttentionConfig.k_by_key / prefetch_blocks for decode batches and for prefill.
DECODE_K_BY_KEY = True
DECODE_PREFETCH_BLOCKS = True
PREFILL_K_BY_KEY = True
PREFILL_PREFETCH_BLOCKS = True
# AttentionConfig.unmasked_prefix for decode batches and for prefill.
DECODE_UNMASKED_PREFIX = False
PREFILL_UNMASKED_PREFIX = True


class AttentionConfig(NamedTuple):
    """Everything the launch derives from shapes: tiles, segments, warps, pipeline stages."""

    block_m: int  # rows of the Q tile: block_q tokens x q_per_kv heads, padded to a power of 2
    block_q: int  # query tokens per program
    tile: int  # keys per loop step
    num_segments: int  # 1: 2D path; > 1: split-KV with a reduction
    num_warps: int
    num_stages: int
    # Load K tiles as (tile, head) rows, like V, and transpose in registers for Q.K^T; False
    # loads (head, tile) directly. A tuning switch until a GPU run says which is faster.
    k_by_key: bool = False
    # Load each tile's block-table entries one loop step early, carried in registers. Without
    # it the block-table -> K/V address chain uses up the software pipeline's stages and the
    # sm_90 compile keeps a single K/V buffer (no load in flight during compute) at 3 or 4
    # stages; with it, 3 stages double-buffer K/V (twice the shared memory).
    prefetch_blocks: bool = False
    # Walk the key tiles every row of the Q block sees whole (all before its first token)
    # without the causal and bounds masks, and mask only the tiles at the diagonal. No effect
    # with a sliding window.
    unmasked_prefix: bool = False


def choose_num_segments(
    *,
    num_seqs: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int,
) -> int:
    """How many segments to split each sequence's keys into (1 = no split).

    Split only pure decode batches (``max_query_len == 1``): a prefill already has many query
    blocks, and a chunk of prefill tokens over a long context is compute-bound, not
    latency-bound. Split only when the 2D grid (``num_seqs * num_kv_heads`` programs) is less
    than one wave on ``num_sms`` SMs; then aim for ``TARGET_WAVES`` waves, keeping every segment
    at least ``MIN_SEGMENT_TOKENS`` long, rounded down to a power of two (the reduction tiles
    over segments) and capped at ``MAX_SEGMENTS``. Llama-3.1-8B (8 KV heads) on 132 SMs:
    batch 64 x 4096 -> 1 (512 programs), batch 1 x 32K -> 32 (256 programs of 1024 keys).
    """
    if max_query_len != 1:
        return 1
    work = num_seqs * num_kv_heads
    if work >= num_sms:
        return 1
    wanted = min(cdiv(TARGET_WAVES * num_sms, max(work, 1)), max_seq_len // MIN_SEGMENT_TOKENS)
    wanted = min(wanted, MAX_SEGMENTS)
    if wanted < 2:
        return 1
    return 1 << (wanted.bit_length() - 1)  # largest power of two <= wanted


def attention_config(
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    num_seqs: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int,
    num_segments: int | None = None,
) -> AttentionConfig:
    """The launch configuration for a batch; ``num_segments`` overrides the split heuristic.

    Q tile: decode batches put one token's ``q_per_kv`` heads in a 16-row tile (``tl.dot`` needs
    at least 16 rows); prefill packs up to 128 rows (``128 // q_per_kv`` tokens) so each K/V
    tile is reused by many queries, fewer for short chunks so mixed batches waste few rows;
    head size 256 halves the cap to keep Q, K and V tiles within shared memory. Key tile: 64
    (four 16-token pages, 16 KiB of bf16 K per step at head 128), 32 for head size 256;
    decode batches take ``DECODE_TILE``/``SPLIT_TILE`` and the other module switches.
    """
    q_per_kv = num_q_heads // num_kv_heads
    min_rows = max(16, next_power_of_2(q_per_kv))
    max_rows = 128 if head_size <= 128 else 64
    if max_query_len <= 1:
        block_m = min_rows
    else:
        block_m = max(min_rows, min(max_rows, next_power_of_2(max_query_len * q_per_kv)))
    block_q = max(block_m // q_per_kv, 1)
    if num_segments is None:
        num_segments = choose_num_segments(
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            num_sms=num_sms,
        )
    decode = max_query_len <= 1
    if head_size > 128:
        tile = 32
    elif decode:
        tile = SPLIT_TILE if num_segments > 1 else DECODE_TILE
    else:
        tile = 64
    # 8 warps once the fp32 accumulator tile reaches 128 x 128 (64 KiB): with 4 warps it alone
    # would take 128 registers a thread, and ptxas spills (sm_90 compile, head 256 x 64 rows:
    # 255 registers and a stack at 4 warps, 177 and none at 8). Small decode tiles are
    # load-bound, and their pipeline depth is a tuning switch: at 3 stages the sm_90 compile
    # keeps a single K/V buffer unless prefetch_blocks is on (see AttentionConfig).
    num_warps = 8 if block_m * next_power_of_2(head_size) >= 128 * 128 else 4
    small_tile_stages = DECODE_STAGES if decode else 3
    num_stages = 3 if block_m >= 128 else small_tile_stages
    return AttentionConfig(
        block_m=block_m,
        block_q=block_q,
        tile=tile,
        num_segments=num_segments,
        num_warps=num_warps,
        num_stages=num_stages,
        k_by_key=DECODE_K_BY_KEY if decode else PREFILL_K_BY_KEY,
        prefetch_blocks=DECODE_PREFETCH_BLOCKS if decode else PREFILL_PREFETCH_BLOCKS,
        unmasked_prefix=DECODE_UNMASKED_PREFIX if decode else PREFILL_UNMASKED_PREFIX,
    )
