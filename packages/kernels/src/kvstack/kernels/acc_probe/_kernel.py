"""Triton kernel: a matmul that truncates each K block's product before accumulating."""

from __future__ import annotations

import triton
import triton.language as tl


# Triton binds kernel arguments by position and launchers pass them by keyword, so the long
# positional list is the kernel's calling convention.
@triton.jit
def truncated_matmul_kernel(
    a_ptr,  # [M, K], fp8 e4m3 / fp16 / fp32
    b_ptr,  # [K, N]
    c_ptr,  # [M, N] fp32
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    trunc_mask,  # int32 bit pattern: 1s above the N_trun low mantissa bits, 0s in them
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_TO_FP16: tl.constexpr,  # convert operands to fp16 first (forces the FP16 engine)
    MAX_NUM_IMPRECISE_ACC: tl.constexpr,  # 0: Triton's default; else promote to fp32 every N
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        # A : (BLOCK_M, BLOCK_K), B : (BLOCK_K, BLOCK_N)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
            mask=(offs_m[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(k[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )
        if UPCAST_TO_FP16:
            a = a.to(tl.float16)
            b = b.to(tl.float16)
        # The block's product alone, no accumulator passed in: a chained accumulator would keep
        # the engine's extra bits across blocks and hide the truncation below.
        if MAX_NUM_IMPRECISE_ACC > 0:
            d = tl.dot(a, b, max_num_imprecise_acc=MAX_NUM_IMPRECISE_ACC, input_precision="ieee")
        else:
            d = tl.dot(a, b, input_precision="ieee")
        # Zero the low mantissa bits of the fp32 product, then accumulate in fp32.
        d = (d.to(tl.int32, bitcast=True) & trunc_mask).to(tl.float32, bitcast=True)
        acc += d

    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )
