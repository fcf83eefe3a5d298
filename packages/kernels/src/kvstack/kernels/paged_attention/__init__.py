"""Paged attention over a paged KV cache, in the flattened variable-length layout.

One launch serves a batch that mixes prefills, chunked prefills and decodes: every sequence
contributes its new tokens to ``query`` and attends causally to its whole context, read from
cache pages through its block-table row. Grouped-query attention loads each K/V tile once for
all query heads of a KV head. Small decode batches over long contexts take the split-KV path
(``_heuristics.choose_num_segments``).
"""

from __future__ import annotations

import functools
import math

import torch

from kvstack.kernels._checks import (
    INDEX_DTYPES,
    check_dtype,
    check_inner_contiguous,
    check_ndim,
    check_same_device,
    check_size,
    dtype_name,
    shape_of,
)
from kvstack.kernels._env import triton_interpreter_enabled
from kvstack.kernels._launch import launch, next_power_of_2
from kvstack.kernels.errors import BadDtype, BadLayout, BadShape, UnsupportedConfig
from kvstack.kernels.paged_attention._heuristics import (
    REDUCE_CHUNK,
    SEGMENT_LIMIT,
    AttentionConfig,
    attention_config,
    choose_num_segments,
)
from kvstack.kernels.paged_attention._kernel import paged_attention_kernel, reduce_segments_kernel
from kvstack.kernels.paged_attention.reference import paged_attention_reference

__all__ = [
    "AttentionConfig",
    "attention_config",
    "choose_num_segments",
    "paged_attention",
    "paged_attention_reference",
]

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# tl.dot needs 16 along every dimension; above 256 the Q tile and one K/V tile no longer fit in
# shared memory together.
MAX_HEAD_SIZE = 256

_QUERY_LAYOUT = "[num_tokens, num_q_heads, head_size]"
_CACHE_LAYOUT = "[num_blocks, block_size, num_kv_heads, head_size]"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs one program at a time
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_last_dim(name: str, tensor: torch.Tensor) -> None:
    if tensor.stride(-1) != 1 and tensor.shape[-1] != 1:
        raise BadLayout(
            name,
            f"has shape {shape_of(tensor)} and strides {list(tensor.stride())}; "
            "the last dimension must be contiguous",
        )


def _check_config(config: AttentionConfig, q_per_kv: int, num_segments: int | None) -> None:
    if num_segments is not None:
        raise UnsupportedConfig(
            "num_segments", num_segments, "give either num_segments or config, not both"
        )
    for name in ("block_m", "tile", "num_segments", "num_warps"):
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise UnsupportedConfig(f"config.{name}", value, "must be a power of two")
    # tl.dot needs 16 rows and 16 keys at least.
    if config.block_m < 16 or config.tile < 16:
        raise UnsupportedConfig("config", config, "block_m and tile must be at least 16")
    if config.block_q < 1 or config.block_q * q_per_kv > config.block_m:
        raise UnsupportedConfig(
            "config.block_q",
            config.block_q,
            f"block_q x {q_per_kv} query heads per KV head must fit in block_m={config.block_m}",
        )
    if config.num_segments > SEGMENT_LIMIT:
        raise UnsupportedConfig(
            "config.num_segments", config.num_segments, f"must be at most {SEGMENT_LIMIT}"
        )
    if config.num_stages < 1:
        raise UnsupportedConfig("config.num_stages", config.num_stages, "must be at least 1")


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_segments: int | None = None,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's new tokens over its paged context.

    ``query``: ``[num_tokens, num_q_heads, head_size]`` float16/bfloat16/float32, the new
    tokens of all sequences concatenated. ``key_cache``, ``value_cache``: ``[num_blocks,
    block_size, num_kv_heads, head_size]``, query's dtype, each page contiguous (the block
    stride is free: K/V views of one interleaved cache work); ``num_q_heads`` a multiple of
    ``num_kv_heads``. ``block_table``: ``[num_seqs, max_blocks_per_seq]`` int32/int64.
    ``seq_lens``: ``[num_seqs]``, tokens of each sequence including its new ones.
    ``query_start``: ``[num_seqs + 1]``, sequence s owns query rows ``query_start[s] ..
    query_start[s + 1]``, which are its last tokens. ``scale`` defaults to
    ``1 / sqrt(head_size)``; ``sliding_window=W``: a query sees only the W most recent keys,
    itself included; ``soft_cap=c``: scores become ``c * tanh(score / c)``.
    ``max_query_len``/``max_seq_len``: the batch maxima, read from the tensors (a device sync)
    when not given; they only steer the launch configuration, never the result.
    ``num_segments`` (power of two <= 256) forces the split-KV path (> 1) or the 2D path (1)
    instead of the heuristic; ``config`` replaces the whole launch configuration (tuning and
    benchmarks; see ``attention_config``). ``out``: ``query``-shaped output, allocated when not
    given. Softmax and both products accumulate in float32.

    Raises BadShape, BadDtype, BadDevice or BadLayout naming the offending tensor, and
    UnsupportedConfig for an out-of-range option.
    """
    check_ndim("query", query, 3, _QUERY_LAYOUT)
    check_ndim("key_cache", key_cache, 4, _CACHE_LAYOUT)
    check_ndim("value_cache", value_cache, 4, _CACHE_LAYOUT)
    check_ndim("block_table", block_table, 2, "[num_seqs, max_blocks_per_seq]")
    check_ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    check_ndim("query_start", query_start, 1, "[num_seqs + 1]")
    check_dtype("query", query, ATTENTION_DTYPES)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dtype != query.dtype:
            raise BadDtype(
                name,
                f"has dtype {dtype_name(cache.dtype)} but query has {dtype_name(query.dtype)}",
            )
    for name, index in (
        ("block_table", block_table),
        ("seq_lens", seq_lens),
        ("query_start", query_start),
    ):
        check_dtype(name, index, INDEX_DTYPES)
    num_tokens, num_q_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    check_size("key_cache", key_cache, 3, head_size, "head_size of query")
    for dim in range(4):
        check_size("value_cache", value_cache, dim, key_cache.shape[dim], "shape of key_cache")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise BadShape(
            "query",
            f"has shape {shape_of(query)}: {num_q_heads} query heads is no multiple of the "
            f"{num_kv_heads} KV heads of key_cache {shape_of(key_cache)}",
        )
    if not 1 <= head_size <= MAX_HEAD_SIZE:
        raise BadShape("query", f"has shape {shape_of(query)}; head_size must be 1..256")
    check_size("block_table", block_table, 0, num_seqs, "num_seqs of seq_lens")
    check_size("query_start", query_start, 0, num_seqs + 1, "num_seqs of seq_lens, plus one")
    _check_last_dim("query", query)
    _check_last_dim("block_table", block_table)
    check_inner_contiguous("key_cache", key_cache, 1)
    check_inner_contiguous("value_cache", value_cache, 1)
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    else:
        if out.shape != query.shape:
            raise BadShape("out", f"has shape {shape_of(out)}; expected {shape_of(query)} (query)")
        if out.dtype != query.dtype:
            raise BadDtype(
                "out", f"has dtype {dtype_name(out.dtype)} but query has {dtype_name(query.dtype)}"
            )
        _check_last_dim("out", out)
    device = check_same_device(
        {
            "query": query,
            "key_cache": key_cache,
            "value_cache": value_cache,
            "block_table": block_table,
            "seq_lens": seq_lens,
            "query_start": query_start,
            "out": out,
        }
    )
    if scale is None:
        scale = 1.0 / math.sqrt(head_size)
    if sliding_window is not None and sliding_window < 1:
        raise UnsupportedConfig("sliding_window", sliding_window, "must be at least 1 (or None)")
    if soft_cap is not None and not soft_cap > 0:
        raise UnsupportedConfig("soft_cap", soft_cap, "must be positive (or None)")
    if num_segments is not None and (
        num_segments < 1 or num_segments > SEGMENT_LIMIT or num_segments & (num_segments - 1)
    ):
        raise UnsupportedConfig(
            "num_segments", num_segments, f"must be a power of two from 1 to {SEGMENT_LIMIT}"
        )
    if config is not None:
        _check_config(config, num_q_heads // num_kv_heads, num_segments)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start[1:] - query_start[:-1]).max().item())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())

    config = config or attention_config(
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        num_sms=_num_sms(device),
        num_segments=num_segments,
    )
    head_size_padded = max(next_power_of_2(head_size), 16)
    segments = config.num_segments
    if segments > 1:
        segm_out = torch.empty(
            (num_tokens, num_q_heads, segments, head_size_padded),
            dtype=torch.float32,
            device=device,
        )
        segm_max = torch.empty(
            (num_tokens, num_q_heads, segments), dtype=torch.float32, device=device
        )
        segm_expsum = torch.empty_like(segm_max)
    else:
        # Unused by the 2D path; any tensor fills the pointer arguments.
        segm_out = segm_max = segm_expsum = out
    # Upper bound on query blocks: each sequence adds at most one partial block (no host sync).
    grid = (num_tokens // config.block_q + num_seqs, num_kv_heads, segments)
    launch(paged_attention_kernel, grid, device)(
        out_ptr=out,
        segm_out_ptr=segm_out,
        segm_max_ptr=segm_max,
        segm_expsum_ptr=segm_expsum,
        query_ptr=query,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        block_table_ptr=block_table,
        seq_lens_ptr=seq_lens,
        query_start_ptr=query_start,
        scale=scale,
        soft_cap=soft_cap if soft_cap is not None else 0.0,
        num_seqs=num_seqs,
        stride_q_token=query.stride(0),
        stride_q_head=query.stride(1),
        stride_o_token=out.stride(0),
        stride_o_head=out.stride(1),
        stride_k_block=key_cache.stride(0),
        stride_k_slot=key_cache.stride(1),
        stride_k_head=key_cache.stride(2),
        stride_v_block=value_cache.stride(0),
        stride_v_slot=value_cache.stride(1),
        stride_v_head=value_cache.stride(2),
        stride_bt_seq=block_table.stride(0),
        NUM_Q_HEADS=num_q_heads,
        Q_PER_KV=num_q_heads // num_kv_heads,
        BLOCK_SIZE=key_cache.shape[1],
        HEAD_SIZE=head_size,
        HEAD_SIZE_PADDED=head_size_padded,
        BLOCK_M=config.block_m,
        BLOCK_Q=config.block_q,
        TILE=config.tile,
        SLIDING_WINDOW=sliding_window or 0,
        USE_SOFTCAP=soft_cap is not None,
        NUM_SEGMENTS=segments,
        UPCAST=triton_interpreter_enabled() and query.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        K_BY_KEY=config.k_by_key,
        PREFETCH_BLOCKS=config.prefetch_blocks,
        UNMASKED_PREFIX=config.unmasked_prefix,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if segments > 1:
        launch(reduce_segments_kernel, (num_tokens, num_q_heads), device)(
            out_ptr=out,
            segm_out_ptr=segm_out,
            segm_max_ptr=segm_max,
            segm_expsum_ptr=segm_expsum,
            stride_o_token=out.stride(0),
            stride_o_head=out.stride(1),
            NUM_Q_HEADS=num_q_heads,
            HEAD_SIZE=head_size,
            HEAD_SIZE_PADDED=head_size_padded,
            NUM_SEGMENTS=segments,
            SEGMENT_CHUNK=min(segments, REDUCE_CHUNK),
            num_warps=4,
        )
    return out
