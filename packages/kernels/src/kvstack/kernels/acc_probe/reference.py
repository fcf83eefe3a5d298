"""PyTorch references of the accumulator-precision probe.

``truncated_matmul_reference`` is what ``truncated_matmul`` computes when the matrix engine
keeps every bit (float64 block products rounded once to fp32). ``emulated_engine_matmul``
models an engine whose block products keep only ``mantissa_bits``: the probe's analysis must
find exactly that many, which the CPU tests check without a GPU.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP32_MANTISSA_BITS",
    "emulated_engine_matmul",
    "mask_low_bits",
    "truncated_matmul_reference",
    "truncation_mask",
]

# Explicit mantissa bits of IEEE float32: a truncation of N_trun bits leaves 23 - N_trun.
FP32_MANTISSA_BITS = 23


def truncation_mask(trunc_bits: int) -> int:
    """The int32 bit pattern (signed, as Triton passes it) clearing the low ``trunc_bits`` bits.

    ``trunc_bits`` is 0..23: clearing more would reach the exponent.
    """
    if not 0 <= trunc_bits <= FP32_MANTISSA_BITS:
        raise ValueError(f"trunc_bits={trunc_bits} must be 0..{FP32_MANTISSA_BITS}")
    mask = (0xFFFFFFFF >> trunc_bits) << trunc_bits
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def mask_low_bits(x: torch.Tensor, trunc_bits: int) -> torch.Tensor:
    """fp32 ``x`` with the low ``trunc_bits`` mantissa bits of every element zeroed."""
    return (x.float().view(torch.int32) & truncation_mask(trunc_bits)).view(torch.float32)


def _round_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float64 ``x`` truncated (towards zero) to ``mantissa_bits`` explicit mantissa bits."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    scale = float(2 ** (mantissa_bits + 1))
    return torch.ldexp(torch.trunc(mantissa * scale) / scale, exponent)


def truncated_matmul_reference(
    a: torch.Tensor, b: torch.Tensor, *, block_k: int, trunc_bits: int
) -> torch.Tensor:
    """``[M, N]`` fp32: sum over K blocks of ``mask_low_bits(fp32(a_blk @ b_blk), trunc_bits)``.

    Block products are exact in float64, rounded once to fp32; the sum runs in fp32, in order.
    """
    return emulated_engine_matmul(
        a, b, block_k=block_k, trunc_bits=trunc_bits, mantissa_bits=FP32_MANTISSA_BITS
    )


def emulated_engine_matmul(
    a: torch.Tensor, b: torch.Tensor, *, block_k: int, trunc_bits: int, mantissa_bits: int
) -> torch.Tensor:
    """Like ``truncated_matmul_reference``, but each block product keeps ``mantissa_bits``.

    An engine with an e8m13 accumulator (H100 FP8, per the PyTorch blog) is
    ``mantissa_bits=13``: its products end in 10 zero bits, so truncating up to 10 bits changes
    nothing.
    """
    a64, b64 = a.double(), b.double()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for k0 in range(0, a.shape[1], block_k):
        block = a64[:, k0 : k0 + block_k] @ b64[k0 : k0 + block_k]
        if mantissa_bits < FP32_MANTISSA_BITS:
            block = _round_mantissa(block, mantissa_bits)
        acc += mask_low_bits(block.float(), trunc_bits)
    return acc
