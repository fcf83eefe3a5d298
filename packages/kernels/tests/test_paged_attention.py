"""Paged attention against its reference over shape grids, both paths, and input checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kvstack.kernels import BadDtype, BadShape, UnsupportedConfig, paged_attention
from kvstack.kernels.paged_attention import (
    AttentionConfig,
    attention_config,
    choose_num_segments,
    paged_attention_reference,
)
from kvstack.kernels.paged_attention._heuristics import DECODE_TILE, SPLIT_TILE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Batches as (new tokens, total tokens) per sequence.
BATCHES = {
    # Mixed: a decode over a context that is no multiple of the page or the key tile; a short
    # chunked prefill; a whole prefill (no context) of odd length; a chunked prefill longer than
    # one Q block; a one-token sequence; a sequence with no new tokens this step.
    "mixed": [(1, 133), (5, 18), (29, 29), (37, 70), (1, 1), (0, 10)],
    # Pure decode over contexts of many pages (the split-KV candidates).
    "decode": [(1, 523), (1, 37), (1, 200)],
}
# (num_q_heads, num_kv_heads): GQA ratios 1, 4 and 8, and 5 (no power of two: a padded Q tile).
HEADS = [(4, 4), (8, 2), (8, 1), (5, 1)]
HEAD_SIZES = [64, 128]
# Window 24: shorter than most contexts above, so whole key tiles are skipped and partial tiles
# masked; None: full causal attention.
WINDOWS = [None, 24]
# Cap 10 with scores of a few units: tanh visibly bends the larger ones.
SOFT_CAPS = [None, 10.0]
# bf16 runs on the interpreter too because the launcher upcasts after loading there.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances vs the float32 reference: fp32 loses only summation order; fp16/bf16 round P
# before the P.V product and round the output (fp16 11, bf16 8 mantissa bits).
# (atol, rtol) per dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.5e-2, 1.5e-2),
}
BLOCK_SIZE = 16
SEEDS = [0]


def _make_batch(
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    seed: int,
    block_size: int = BLOCK_SIZE,
    device: str = DEVICE,
) -> dict[str, torch.Tensor]:
    """Random query and caches; each sequence on a shuffled set of pages, the rest NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(total / block_size) for _, total in seqs]
    max_pages = max(pages_per_seq)
    # Spare pages, all NaN, stand in for other requests' pages: reading one poisons the output.
    num_blocks = sum(pages_per_seq) + 7
    num_tokens = sum(new for new, _ in seqs)
    query = torch.randn(num_tokens, num_q_heads, head_size, generator=gen)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.full(cache_shape, float("nan"))
    value_cache = torch.full(cache_shape, float("nan"))
    order = torch.randperm(num_blocks, generator=gen)
    nan_page = int(order[-1])
    block_table = torch.full((len(seqs), max_pages), nan_page, dtype=torch.int32)
    used = 0
    for seq, (_, total) in enumerate(seqs):
        pages = order[used : used + pages_per_seq[seq]]
        used += pages_per_seq[seq]
        block_table[seq, : len(pages)] = pages.to(torch.int32)
        keys = torch.randn(total, num_kv_heads, head_size, generator=gen)
        values = torch.randn(total, num_kv_heads, head_size, generator=gen)
        # Only the sequence's tokens are written: the tail of its last page stays NaN.
        key_cache.view(-1, num_kv_heads, head_size)[_slots(pages, total, block_size)] = keys
        value_cache.view(-1, num_kv_heads, head_size)[_slots(pages, total, block_size)] = values
    starts = [0]
    for new, _ in seqs:
        starts.append(starts[-1] + new)
    return {
        "query": query.to(dtype).to(device),
        "key_cache": key_cache.to(dtype).to(device),
        "value_cache": value_cache.to(dtype).to(device),
        "block_table": block_table.to(device),
        "seq_lens": torch.tensor([total for _, total in seqs], dtype=torch.int32, device=device),
        "query_start": torch.tensor(starts, dtype=torch.int32, device=device),
    }


def _slots(pages: torch.Tensor, total: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(total)
    return pages[positions // block_size].long() * block_size + positions % block_size


def _run_and_compare(
    batch: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    sliding_window: int | None,
    soft_cap: float | None,
    num_segments: int | None,
) -> None:
    query = batch["query"]
    # Poisoned output: a row the kernel fails to write stays NaN and fails the comparison.
    out = torch.full_like(query, float("nan"))
    expected = paged_attention_reference(
        query,
        batch["key_cache"],
        batch["value_cache"],
        block_table=batch["block_table"],
        seq_lens=batch["seq_lens"],
        query_start=batch["query_start"],
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )

    result = paged_attention(
        query,
        batch["key_cache"],
        batch["value_cache"],
        block_table=batch["block_table"],
        seq_lens=batch["seq_lens"],
        query_start=batch["query_start"],
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        num_segments=num_segments,
        out=out,
    )

    assert result is out
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("soft_cap", SOFT_CAPS, ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("sliding_window", WINDOWS, ids=lambda w: f"window{w}")
@pytest.mark.parametrize("head_size", HEAD_SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS, ids=str)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_reference(
    *,
    batch: str,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    sliding_window: int | None,
    soft_cap: float | None,
    dtype: torch.dtype,
    seed: int,
) -> None:
    inputs = _make_batch(
        BATCHES[batch],
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        dtype=dtype,
        seed=seed,
    )
    _run_and_compare(
        inputs, dtype=dtype, sliding_window=sliding_window, soft_cap=soft_cap, num_segments=None
    )


# 2: two halves; 8: more segments than the 37- and 200-token sequences have key tiles (64 keys
# each), so some segments are empty. The cap, 64, costs ~3 s a case on the interpreter (a
# program per segment): the GPU tests run it.
SEGMENTS = [2, 8]


@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sliding_window", WINDOWS, ids=lambda w: f"window{w}")
@pytest.mark.parametrize("num_segments", SEGMENTS, ids=lambda s: f"segments{s}")
def test_split_kv_matches_reference(
    *, num_segments: int, sliding_window: int | None, dtype: torch.dtype, seed: int
) -> None:
    inputs = _make_batch(
        BATCHES["decode"], num_q_heads=8, num_kv_heads=2, head_size=64, dtype=dtype, seed=seed
    )
    _run_and_compare(
        inputs,
        dtype=dtype,
        sliding_window=sliding_window,
        soft_cap=10.0,
        num_segments=num_segments,
    )


def test_split_kv_on_a_mixed_batch() -> None:
    """Forcing segments on prefill rows is allowed (the heuristic never does it) and exact."""
    inputs = _make_batch(
        BATCHES["mixed"], num_q_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32, seed=3
    )
    _run_and_compare(
        inputs, dtype=torch.float32, sliding_window=None, soft_cap=None, num_segments=2
    )


# Tuning switches the heuristic does not pick yet: K loaded as (tile, head) rows; 64 segments,
# two chunks of the reduction, most of them empty at these lengths; block ids prefetched a step
# ahead (tile 16: a step per page, so the prefetch crosses every page boundary); unmasked tiles
# before the diagonal (tile 16 < the mixed batch's 37-token chunk: some Q blocks have them).
TUNING_CONFIGS = {
    "k_by_key": ("decode", AttentionConfig(16, 4, 32, 1, 4, 3, k_by_key=True)),
    "segments64": ("decode", AttentionConfig(16, 4, 16, 64, 4, 3)),
    "segments64_k_by_key": ("decode", AttentionConfig(16, 4, 16, 64, 4, 3, k_by_key=True)),
    "prefill_k_by_key": ("mixed", AttentionConfig(32, 8, 32, 1, 4, 2, k_by_key=True)),
    "prefetch": ("decode", AttentionConfig(16, 4, 32, 1, 4, 3, prefetch_blocks=True)),
    "prefetch_k_by_key_split": (
        "decode",
        AttentionConfig(16, 4, 16, 8, 4, 3, k_by_key=True, prefetch_blocks=True),
    ),
    "prefill_prefetch": ("mixed", AttentionConfig(32, 8, 16, 1, 4, 3, prefetch_blocks=True)),
    "prefill_unmasked": (
        "mixed",
        AttentionConfig(32, 8, 16, 1, 4, 3, k_by_key=True, unmasked_prefix=True),
    ),
    "split_unmasked_prefetch": (
        "decode",
        AttentionConfig(16, 4, 16, 8, 4, 3, prefetch_blocks=True, unmasked_prefix=True),
    ),
}


@pytest.mark.parametrize("name", list(TUNING_CONFIGS))
def test_tuning_switches_match_reference(name: str) -> None:
    batch_name, config = TUNING_CONFIGS[name]
    dtype = torch.float16
    inputs = _make_batch(
        BATCHES[batch_name], num_q_heads=8, num_kv_heads=2, head_size=64, dtype=dtype, seed=5
    )
    query, key_cache, value_cache = inputs["query"], inputs["key_cache"], inputs["value_cache"]
    block_table, seq_lens, query_start = (
        inputs["block_table"],
        inputs["seq_lens"],
        inputs["query_start"],
    )
    expected = paged_attention_reference(
        query,
        key_cache,
        value_cache,
        block_table=block_table,
        seq_lens=seq_lens,
        query_start=query_start,
        soft_cap=10.0,
    )
    out = torch.full_like(query, float("nan"))
    paged_attention(
        query,
        key_cache,
        value_cache,
        block_table=block_table,
        seq_lens=seq_lens,
        query_start=query_start,
        soft_cap=10.0,
        config=config,
        out=out,
    )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


# Page sizes: 1 (every key its own page), 8 (a key tile spans many pages), 32.
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_page_sizes(block_size: int) -> None:
    inputs = _make_batch(
        [(3, 45), (1, 70)],
        num_q_heads=4,
        num_kv_heads=1,
        head_size=64,
        dtype=torch.float16,
        seed=block_size,
        block_size=block_size,
    )
    _run_and_compare(
        inputs, dtype=torch.float16, sliding_window=None, soft_cap=None, num_segments=None
    )


# Head sizes that are no power of two (padded to 64 and 128 in the kernel, masked).
@pytest.mark.parametrize("head_size", [40, 80, 96])
def test_odd_head_sizes(head_size: int) -> None:
    inputs = _make_batch(
        [(3, 40), (1, 70)],
        num_q_heads=4,
        num_kv_heads=2,
        head_size=head_size,
        dtype=torch.float16,
        seed=head_size,
    )
    _run_and_compare(
        inputs, dtype=torch.float16, sliding_window=None, soft_cap=None, num_segments=None
    )


def test_int64_index_tensors() -> None:
    """Block table, lengths and offsets as int64, as callers holding torch defaults pass them."""
    inputs = _make_batch(
        [(3, 40), (1, 70)], num_q_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float16, seed=8
    )
    for name in ("block_table", "seq_lens", "query_start"):
        inputs[name] = inputs[name].long()
    _run_and_compare(
        inputs, dtype=torch.float16, sliding_window=None, soft_cap=None, num_segments=2
    )


def test_interleaved_cache_views_and_default_output() -> None:
    """K and V as views of one [num_blocks, 2, block_size, heads, head] tensor (vLLM's layout)."""
    inputs = _make_batch(
        [(4, 40), (1, 17)], num_q_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float16, seed=9
    )
    kv_cache = torch.stack([inputs["key_cache"], inputs["value_cache"]], dim=1)
    key_cache, value_cache = kv_cache.unbind(1)
    block_table, seq_lens, query_start = (
        inputs["block_table"],
        inputs["seq_lens"],
        inputs["query_start"],
    )

    out = paged_attention(
        inputs["query"],
        key_cache,
        value_cache,
        block_table=block_table,
        seq_lens=seq_lens,
        query_start=query_start,
    )

    expected = paged_attention_reference(
        inputs["query"],
        key_cache,
        value_cache,
        block_table=block_table,
        seq_lens=seq_lens,
        query_start=query_start,
    )
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


def _valid() -> dict[str, torch.Tensor]:
    return _make_batch(
        [(2, 20)], num_q_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float16, seed=0
    )


def _call(inputs: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
    return paged_attention(
        inputs["query"],
        inputs["key_cache"],
        inputs["value_cache"],
        block_table=inputs["block_table"],
        seq_lens=inputs["seq_lens"],
        query_start=inputs["query_start"],
        **options,
    )


@pytest.mark.parametrize(
    ("name", "bad", "error", "match"),
    [
        (
            "query",
            torch.zeros(2, 256, dtype=torch.float16),
            BadShape,
            r"query: has shape \[2, 256\]",
        ),
        ("query", torch.zeros(2, 3, 64, dtype=torch.float16), BadShape, "query: .*no multiple"),
        ("query", torch.zeros(2, 4, 64, dtype=torch.int8), BadDtype, "query: has dtype int8"),
        ("key_cache", torch.zeros(3, 16, 2, 64), BadDtype, "key_cache: has dtype float32"),
        ("value_cache", torch.zeros(3, 16, 2, 32, dtype=torch.float16), BadShape, "value_cache"),
        ("block_table", torch.zeros(1, 2), BadDtype, "block_table: has dtype float32"),
        ("block_table", torch.zeros(2, 2, dtype=torch.int32), BadShape, r"block_table: .*\[2, 2\]"),
        ("query_start", torch.zeros(1, dtype=torch.int32), BadShape, r"query_start: .*\[1\]"),
        ("seq_lens", torch.zeros(1, 1, dtype=torch.int32), BadShape, "seq_lens"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_inputs_name_the_tensor(
    name: str, bad: torch.Tensor, error: type[Exception], match: str
) -> None:
    inputs = _valid()
    inputs[name] = bad.to(DEVICE)
    with pytest.raises(error, match=match):
        _call(inputs)


@pytest.mark.parametrize(
    ("option", "value"),
    [("sliding_window", 0), ("soft_cap", 0.0), ("num_segments", 3), ("num_segments", 512)],
)
def test_bad_options_name_the_option(option: str, value: float) -> None:
    with pytest.raises(UnsupportedConfig, match=f"{option}={value!r}"):
        _call(_valid(), **{option: value})


def test_config_override() -> None:
    """A hand-picked launch configuration computes the same result as the heuristic's."""
    inputs = _valid()
    expected = _call(inputs)
    config = AttentionConfig(
        block_m=32, block_q=2, tile=16, num_segments=2, num_warps=4, num_stages=2
    )
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(_call(inputs, config=config), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (AttentionConfig(16, 9, 64, 1, 4, 3), "config.block_q=9"),  # 9 tokens x 2 heads > 16
        (AttentionConfig(24, 1, 64, 1, 4, 3), "config.block_m=24"),
        (AttentionConfig(16, 1, 8, 1, 4, 3), "block_m and tile must be at least 16"),
        (AttentionConfig(16, 1, 64, 512, 4, 3), "config.num_segments=512"),
    ],
)
def test_bad_config_is_named(config: AttentionConfig, match: str) -> None:
    with pytest.raises(UnsupportedConfig, match=match):
        _call(_valid(), config=config)
    with pytest.raises(UnsupportedConfig, match="either num_segments or config"):
        _call(_valid(), config=AttentionConfig(16, 1, 64, 1, 4, 3), num_segments=2)


def test_out_must_match_query() -> None:
    inputs = _valid()
    with pytest.raises(BadShape, match=r"out: has shape \[2, 4, 32\]"):
        _call(inputs, out=torch.empty(2, 4, 32, dtype=torch.float16, device=DEVICE))


def test_split_heuristic() -> None:
    llama = {"num_kv_heads": 8, "max_query_len": 1, "num_sms": 132}
    # Batch 64 x 4096: 512 programs already fill 132 SMs.
    assert choose_num_segments(num_seqs=64, max_seq_len=4096, **llama) == 1
    # Batch 1 x 32K: 8 programs; two waves want 33 segments, rounded down to 32.
    assert choose_num_segments(num_seqs=1, max_seq_len=32768, **llama) == 32
    # Short contexts are not split below MIN_SEGMENT_TOKENS per segment.
    assert choose_num_segments(num_seqs=1, max_seq_len=1500, **llama) == 2
    assert choose_num_segments(num_seqs=1, max_seq_len=600, **llama) == 1
    # Never for prefill, capped at 64.
    prefill = {**llama, "max_query_len": 7}
    assert choose_num_segments(num_seqs=1, max_seq_len=32768, **prefill) == 1
    one_head = {**llama, "num_kv_heads": 1}
    assert choose_num_segments(num_seqs=1, max_seq_len=1 << 20, **one_head) == 64


def test_tile_heuristic() -> None:
    common = {"num_seqs": 4, "max_seq_len": 4096, "num_sms": 132}
    # The decode key tiles are tuning switches (tune_sweep.py): whatever they are set to.
    # 64 sequences x 8 KV heads fill 132 SMs: the 2D path.
    decode = attention_config(
        num_q_heads=32, num_kv_heads=8, head_size=128, max_query_len=1, **{**common, "num_seqs": 64}
    )
    assert (decode.block_m, decode.block_q, decode.tile) == (16, 4, DECODE_TILE)
    assert decode.num_segments == 1
    # 4 sequences x 8 KV heads do not: split-KV, with its own tile.
    split = attention_config(
        num_q_heads=32, num_kv_heads=8, head_size=128, max_query_len=1, **common
    )
    assert split.num_segments > 1
    assert split.tile == SPLIT_TILE
    prefill = attention_config(
        num_q_heads=32, num_kv_heads=8, head_size=128, max_query_len=4096, **common
    )
    assert (prefill.block_m, prefill.block_q, prefill.num_warps) == (128, 32, 8)
    # GQA 8 with head 256: the Q tile caps at 64 rows, 8 tokens.
    wide = attention_config(
        num_q_heads=64, num_kv_heads=8, head_size=256, max_query_len=300, **common
    )
    assert (wide.block_m, wide.block_q, wide.tile, wide.num_warps) == (64, 8, 32, 8)
    # More heads per KV head than 16: the tile grows to hold one token's group.
    mqa = attention_config(num_q_heads=32, num_kv_heads=1, head_size=64, max_query_len=1, **common)
    assert (mqa.block_m, mqa.block_q) == (32, 1)
    forced = attention_config(
        num_q_heads=8, num_kv_heads=8, head_size=64, max_query_len=1, num_segments=4, **common
    )
    assert forced.num_segments == 4


# Real sizes on the GPU, bf16: Llama-3.1-8B heads (32/8, head 128), page 16.
GPU_BATCHES = {
    "mixed": [(1, 4096), (1000, 1000), (333, 2100), (1, 17), (64, 64)],
    "decode": [(1, 4096)] * 16 + [(1, 37), (1, 1999)],
    "long_decode": [(1, 32768)],
}


@pytest.mark.gpu
@pytest.mark.parametrize(("sliding_window", "soft_cap"), [(None, None), (1024, 50.0)])
@pytest.mark.parametrize("head_size", HEAD_SIZES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
def test_llama_shapes_bf16_on_gpu(
    batch: str, head_size: int, sliding_window: int | None, soft_cap: float | None
) -> None:
    inputs = _make_batch(
        GPU_BATCHES[batch],
        num_q_heads=32,
        num_kv_heads=8,
        head_size=head_size,
        dtype=torch.bfloat16,
        seed=head_size,
        device="cuda",
    )
    _run_and_compare(
        inputs,
        dtype=torch.bfloat16,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        num_segments=None,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("num_segments", [1, 16, 64])
def test_long_decode_both_paths_bf16_on_gpu(num_segments: int) -> None:
    inputs = _make_batch(
        [(1, 32768), (1, 5000)],
        num_q_heads=32,
        num_kv_heads=8,
        head_size=128,
        dtype=torch.bfloat16,
        seed=num_segments,
        device="cuda",
    )
    _run_and_compare(
        inputs,
        dtype=torch.bfloat16,
        sliding_window=None,
        soft_cap=None,
        num_segments=num_segments,
    )


@pytest.mark.gpu
def test_cache_offsets_past_int32_on_gpu() -> None:
    """Pages beyond element 2**31 of the cache (vLLM tests 32768 blocks for the same reason)."""
    heads, head_size, block_size = 8, 128, 16
    # 150000 blocks x 16 x 8 x 128 = 2.46e9 elements (4.9 GB of bf16) per cache.
    num_blocks = 150_000
    key_cache = torch.empty(
        num_blocks, block_size, heads, head_size, device="cuda", dtype=torch.bfloat16
    )
    value_cache = torch.empty_like(key_cache)
    gen = torch.Generator(device="cuda").manual_seed(21)
    seq_len = 1000
    pages = torch.arange(num_blocks - 63, num_blocks, device="cuda", dtype=torch.int32)
    key_cache[pages.long()] = torch.randn(
        63, block_size, heads, head_size, generator=gen, device="cuda"
    ).to(torch.bfloat16)
    value_cache[pages.long()] = torch.randn(
        63, block_size, heads, head_size, generator=gen, device="cuda"
    ).to(torch.bfloat16)
    query = torch.randn(8, 32, head_size, generator=gen, device="cuda").to(torch.bfloat16)
    args = {
        "block_table": pages.flip(0)[None, :].contiguous(),
        "seq_lens": torch.tensor([seq_len], dtype=torch.int32, device="cuda"),
        "query_start": torch.tensor([0, 8], dtype=torch.int32, device="cuda"),
    }

    out = paged_attention(query, key_cache, value_cache, **args)

    expected = paged_attention_reference(query, key_cache, value_cache, **args)
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
