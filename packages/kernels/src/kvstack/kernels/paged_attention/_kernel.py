"""Triton kernels: unified paged attention (varlen, causal, GQA, split-KV) and its reduction."""

from __future__ import annotations

import triton
import triton.language as tl

# exp(x) == exp2(x * LOG2E): scores are kept in the log2 domain so the loop uses exp2.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # 1/ln(2)


@triton.jit
def _find_seq(query_start_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning global query block ``q_block`` (binary search, no host sync).

    Sequence s owns blocks from ``query_start[s] // BLOCK_Q + s``: each sequence gets at most
    one partial block more than ``num_tokens // BLOCK_Q`` accounts for, hence the ``+ s``.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _soft_cap(x, cap):
    """``cap * tanh(x / cap)``; tanh(y) = 1 - 2 / (exp(2y) + 1) saturates to +-1 without NaN."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


@triton.jit
def _attend(
    acc,  # (BLOCK_M, HEAD_SIZE_PADDED) fp32, unnormalised output so far
    l_i,  # (BLOCK_M,) running sum of exp2
    m_i,  # (BLOCK_M,) running max, log2 domain
    q,  # (BLOCK_M, HEAD_SIZE_PADDED)
    tile_lo,
    tile_hi,
    kv_end,  # keys at or past this position are masked (MASKED only)
    query_abs,  # (BLOCK_M,) absolute position of each row's token
    row_valid,
    offs_d,
    dim_valid,
    kv_head,
    block_table_row,
    key_cache_ptr,
    value_cache_ptr,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    scale,
    qk_scale,
    soft_cap,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    K_BY_KEY: tl.constexpr,
    PREFETCH_BLOCKS: tl.constexpr,
    MASKED: tl.constexpr,  # False: the caller guarantees every row sees every key of the tiles
):
    """Online-softmax attention of the Q tile over key tiles ``tile_lo .. tile_hi``."""
    if PREFETCH_BLOCKS:
        # The block-table load of a tile feeds the addresses of its K/V loads; issuing it one
        # step early takes it off the chain the software pipeline has to cover.
        next_pos = tile_lo * TILE + tl.arange(0, TILE)
        next_block = tl.load(
            block_table_row + next_pos // BLOCK_SIZE, mask=next_pos < kv_end, other=0
        )
    else:
        next_block = tl.zeros([TILE], dtype=tl.int32)  # unused: keeps the name bound
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE + tl.arange(0, TILE)
        key_valid = key_pos < kv_end
        # int64: block * stride passes 2**31 elements in caches over 4 GiB.
        if PREFETCH_BLOCKS:
            block = next_block.to(tl.int64)
            next_pos = key_pos + TILE
            next_block = tl.load(
                block_table_row + next_pos // BLOCK_SIZE, mask=next_pos < kv_end, other=0
            )
        else:
            block = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
            block = block.to(tl.int64)
        slot = key_pos % BLOCK_SIZE

        if K_BY_KEY:
            # K : (TILE, HEAD_SIZE_PADDED), the same access pattern as V, then (HEAD, TILE)
            k = tl.trans(
                tl.load(
                    key_cache_ptr
                    + block[:, None] * stride_k_block
                    + slot[:, None] * stride_k_slot
                    + kv_head * stride_k_head
                    + offs_d[None, :],
                    mask=key_valid[:, None] & dim_valid[None, :],
                    other=0.0,
                )
            )
        else:
            # K : (HEAD_SIZE_PADDED, TILE)
            k = tl.load(
                key_cache_ptr
                + block[None, :] * stride_k_block
                + slot[None, :] * stride_k_slot
                + kv_head * stride_k_head
                + offs_d[:, None],
                mask=dim_valid[:, None] & key_valid[None, :],
                other=0.0,
            )
        # V : (TILE, HEAD_SIZE_PADDED)
        v = tl.load(
            value_cache_ptr
            + block[:, None] * stride_v_block
            + slot[:, None] * stride_v_slot
            + kv_head * stride_v_head
            + offs_d[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # S : (BLOCK_M, TILE), fp32 accumulation, log2 domain
        if USE_SOFTCAP:
            s = _soft_cap(tl.dot(q, k, input_precision=DOT_PRECISION) * scale, soft_cap) * LOG2E
        else:
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            allowed = (
                row_valid[:, None] & key_valid[None, :] & (key_pos[None, :] <= query_abs[:, None])
            )
            if SLIDING_WINDOW > 0:
                allowed = allowed & (query_abs[:, None] - key_pos[None, :] < SLIDING_WINDOW)
            s = tl.where(allowed, s, float("-inf"))
            # Online softmax; a row with nothing allowed yet keeps max -inf, so subtract 0
            # instead (-inf - -inf would be NaN).
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        else:
            # Every key of the tile is allowed for every row: the max is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = m_new
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Triton binds kernel arguments by position and launchers pass them by keyword, so the long
# positional list is the kernel's calling convention.
@triton.jit
def paged_attention_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_size]
    segm_out_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS, HEAD_SIZE_PADDED] fp32 (split only)
    segm_max_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32, log2 domain (split only)
    segm_expsum_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32 (split only)
    query_ptr,  # [num_tokens, num_q_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]: context + new tokens
    query_start_ptr,  # [num_seqs + 1]: offsets of each sequence's new tokens in query
    scale,  # softmax scale applied to Q.K
    soft_cap,  # logit soft-cap (used when USE_SOFTCAP)
    num_seqs,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    NUM_Q_HEADS: tl.constexpr,
    Q_PER_KV: tl.constexpr,  # query heads sharing one KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,  # next power of two, >= 16 for tl.dot
    BLOCK_M: tl.constexpr,  # rows of the Q tile: BLOCK_Q tokens x Q_PER_KV heads
    BLOCK_Q: tl.constexpr,  # query tokens per program
    TILE: tl.constexpr,  # keys per loop step
    SLIDING_WINDOW: tl.constexpr,  # keys each query sees, itself included; 0 = no window
    USE_SOFTCAP: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,  # 1: write out directly; >1: split-KV, write partial results
    UPCAST: tl.constexpr,  # compute on fp32 copies (the interpreter gets bf16 arithmetic wrong)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (ignored by 16-bit dots)
    K_BY_KEY: tl.constexpr,  # load K as (TILE, HEAD) like V and transpose it in registers
    PREFETCH_BLOCKS: tl.constexpr,  # load the next tile's block ids one step ahead, in registers
    UNMASKED_PREFIX: tl.constexpr,  # skip masking on tiles every row sees whole (no window)
):
    # Reversed: under causal masking the last query blocks of a prefill walk the most keys, so
    # they start first and the short ones fill the last wave (programs launch in pid order).
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = _find_seq(query_start_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        # Surplus program: the grid is an upper bound on blocks so the launch needs no host sync.
        return

    # Row m of the Q tile is query token m // Q_PER_KV of this block, head m % Q_PER_KV of this
    # KV head's group: the group's heads share every K/V tile, loaded once.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    query_pos = q_block_local * BLOCK_Q + offs_m // Q_PER_KV  # position among the new tokens
    head = kv_head * Q_PER_KV + offs_m % Q_PER_KV
    row_valid = (offs_m < BLOCK_Q * Q_PER_KV) & (query_pos < q_len)
    dim_valid = offs_d < HEAD_SIZE
    # int64: token * stride passes 2**31 for long batches.
    token = (q_start + query_pos).to(tl.int64)

    # Q : (BLOCK_M, HEAD_SIZE_PADDED)
    q = tl.load(
        query_ptr
        + token[:, None] * stride_q_token
        + head[:, None] * stride_q_head
        + offs_d[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    query_abs = context_len + query_pos  # absolute position of each row's token
    # Causal: the block's last token sees keys up to its own position.
    kv_end = tl.minimum(context_len + q_block_local * BLOCK_Q + BLOCK_Q, seq_len)
    tile_lo = 0
    if SLIDING_WINDOW > 0:
        # Tiles wholly before the window of the block's first token are skipped.
        kv_start = tl.maximum(context_len + q_block_local * BLOCK_Q - SLIDING_WINDOW + 1, 0)
        tile_lo = kv_start // TILE
    tile_hi = tl.cdiv(kv_end, TILE)
    if NUM_SEGMENTS > 1:
        # Split-KV: this program takes one contiguous share of the sequence's tiles.
        per_segment = tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS)
        tile_lo = tile_lo + segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, tile_hi)

    qk_scale = scale * LOG2E  # one multiply per score when there is no soft-cap
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq

    tile_mid = tile_lo
    if UNMASKED_PREFIX and SLIDING_WINDOW == 0:
        # Tiles wholly at or before the block's first token are seen in full by every row: no
        # causal mask, no bounds mask. Only the tiles at the diagonal pay for masking.
        first_abs = context_len + q_block_local * BLOCK_Q
        tile_mid = tl.minimum(tl.maximum((first_abs + 1) // TILE, tile_lo), tile_hi)
        acc, l_i, m_i = _attend(
            acc,
            l_i,
            m_i,
            q,
            tile_lo,
            tile_mid,
            kv_end,
            query_abs,
            row_valid,
            offs_d,
            dim_valid,
            kv_head,
            block_table_row,
            key_cache_ptr,
            value_cache_ptr,
            stride_k_block,
            stride_k_slot,
            stride_k_head,
            stride_v_block,
            stride_v_slot,
            stride_v_head,
            scale,
            qk_scale,
            soft_cap,
            BLOCK_SIZE,
            TILE,
            SLIDING_WINDOW,
            USE_SOFTCAP,
            UPCAST,
            DOT_PRECISION,
            K_BY_KEY,
            PREFETCH_BLOCKS,
            False,
        )
    acc, l_i, m_i = _attend(
        acc,
        l_i,
        m_i,
        q,
        tile_mid,
        tile_hi,
        kv_end,
        query_abs,
        row_valid,
        offs_d,
        dim_valid,
        kv_head,
        block_table_row,
        key_cache_ptr,
        value_cache_ptr,
        stride_k_block,
        stride_k_slot,
        stride_k_head,
        stride_v_block,
        stride_v_slot,
        stride_v_head,
        scale,
        qk_scale,
        soft_cap,
        BLOCK_SIZE,
        TILE,
        SLIDING_WINDOW,
        USE_SOFTCAP,
        UPCAST,
        DOT_PRECISION,
        K_BY_KEY,
        PREFETCH_BLOCKS,
        True,
    )

    if NUM_SEGMENTS > 1:
        # Unnormalised partial result; an empty segment writes max -inf and sum 0.
        segm = (token * NUM_Q_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(segm_max_ptr + segm, m_i, mask=row_valid)
        tl.store(segm_expsum_ptr + segm, l_i, mask=row_valid)
        tl.store(
            segm_out_ptr + segm[:, None] * HEAD_SIZE_PADDED + offs_d[None, :],
            acc,
            mask=row_valid[:, None],
        )
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr
            + token[:, None] * stride_o_token
            + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit
def reduce_segments_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_size]
    segm_out_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS, HEAD_SIZE_PADDED] fp32
    segm_max_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32, log2 domain
    segm_expsum_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32
    stride_o_token,
    stride_o_head,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    SEGMENT_CHUNK: tl.constexpr,  # segments combined per step; divides NUM_SEGMENTS
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    dim_valid = offs_d < HEAD_SIZE
    first = (token * NUM_Q_HEADS + head) * NUM_SEGMENTS

    # finite: the segment holding the token's own key is never empty
    m_max = tl.max(tl.load(segm_max_ptr + first + tl.arange(0, NUM_SEGMENTS)), axis=0)
    total = 0.0
    acc = tl.zeros([HEAD_SIZE_PADDED], dtype=tl.float32)
    # Chunks bound the (segments, head) fp32 tile in registers when there are many segments.
    for chunk in range(0, NUM_SEGMENTS // SEGMENT_CHUNK):
        segm = first + chunk * SEGMENT_CHUNK + tl.arange(0, SEGMENT_CHUNK)
        weight = tl.exp2(tl.load(segm_max_ptr + segm) - m_max)  # 0 for empty segments
        total += tl.sum(tl.load(segm_expsum_ptr + segm) * weight, axis=0)
        # (SEGMENT_CHUNK, HEAD_SIZE_PADDED)
        parts = tl.load(
            segm_out_ptr + segm[:, None] * HEAD_SIZE_PADDED + offs_d[None, :],
            mask=dim_valid[None, :],
            other=0.0,
        )
        acc += tl.sum(parts * weight[:, None], axis=0)
    tl.store(
        out_ptr + token * stride_o_token + head * stride_o_head + offs_d,
        (acc / total).to(out_ptr.dtype.element_ty),
        mask=dim_valid,
    )
