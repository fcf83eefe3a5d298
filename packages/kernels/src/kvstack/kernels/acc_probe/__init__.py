"""The accumulator-precision probe (PyTorch blog "Some Matrix Multiplication Engines Are Not As
Accurate As We Thought"): a matmul that zeroes the N_trun low mantissa bits of each K block's
``tl.dot`` result before accumulating in fp32. Sweeping N_trun and comparing with N_trun = 0
shows how many mantissa bits the matrix engine's accumulator kept: H100 FP8 reportedly e8m13.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping
from typing import Any

import torch

from kvstack.kernels._checks import (
    check_dtype,
    check_ndim,
    check_same_device,
    check_size,
    dtype_name,
    shape_of,
)
from kvstack.kernels._env import triton_interpreter_enabled
from kvstack.kernels._launch import cdiv, launch
from kvstack.kernels.acc_probe._heuristics import PROBE_DTYPES, ProbeConfig, probe_configs
from kvstack.kernels.acc_probe._kernel import truncated_matmul_kernel
from kvstack.kernels.acc_probe._report import (
    ProbeResult,
    accumulator_mantissa_bits,
    format_probe_table,
    matrix_instructions,
)
from kvstack.kernels.acc_probe.reference import (
    FP32_MANTISSA_BITS,
    emulated_engine_matmul,
    mask_low_bits,
    truncated_matmul_reference,
    truncation_mask,
)
from kvstack.kernels.errors import BadDtype, DeviceUnavailable, UnsupportedConfig

__all__ = [
    "PROBE_DTYPES",
    "ProbeConfig",
    "ProbeResult",
    "accumulator_mantissa_bits",
    "emulated_engine_matmul",
    "format_probe_table",
    "mask_low_bits",
    "matrix_instructions",
    "probe_configs",
    "probe_operands",
    "run_probe",
    "truncated_matmul",
    "truncated_matmul_reference",
    "truncation_mask",
]

logger = logging.getLogger(__name__)

MATMUL_DTYPES = (torch.float8_e4m3fn, torch.float16, torch.float32)
_TORCH_DTYPES = {"fp8e4m3": torch.float8_e4m3fn, "fp16": torch.float16}


def _launch_truncated_matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, trunc_bits: int, config: ProbeConfig
) -> Any:
    """Launch and return what Triton returns: the compiled kernel (None on the interpreter)."""
    m, k = a.shape
    n = b.shape[1]
    grid = (cdiv(m, config.block_m), cdiv(n, config.block_n))
    return launch(truncated_matmul_kernel, grid, a.device)(
        a_ptr=a,
        b_ptr=b,
        c_ptr=out,
        M=m,
        N=n,
        K=k,
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_bk=b.stride(0),
        stride_bn=b.stride(1),
        stride_cm=out.stride(0),
        stride_cn=out.stride(1),
        trunc_mask=truncation_mask(trunc_bits),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        UPCAST_TO_FP16=config.upcast_to_fp16,
        MAX_NUM_IMPRECISE_ACC=config.max_num_imprecise_acc,
        num_warps=config.num_warps,
    )


def _check_operands(a: torch.Tensor, b: torch.Tensor, trunc_bits: int) -> None:
    check_ndim("a", a, 2, "[M, K]")
    check_ndim("b", b, 2, "[K, N]")
    check_dtype("a", a, MATMUL_DTYPES)
    if b.dtype != a.dtype:
        raise BadDtype("b", f"has dtype {dtype_name(b.dtype)} but a has {dtype_name(a.dtype)}")
    check_size("b", b, 0, a.shape[1], f"K of a {shape_of(a)}")
    if not 0 <= trunc_bits <= FP32_MANTISSA_BITS:
        raise UnsupportedConfig("trunc_bits", trunc_bits, "must be 0..23 (fp32 mantissa bits)")


def truncated_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    trunc_bits: int,
    config: ProbeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[M, N]`` fp32: the sum over K blocks of each block product with ``trunc_bits`` zeroed.

    ``a``: ``[M, K]``, ``b``: ``[K, N]``, both fp8 e4m3, fp16 or fp32 (any strides).
    ``config`` sets BLOCK_K, tile and warps (default: BLOCK_K 32, 64 x 64 tile, 4 warps).

    Raises BadShape, BadDtype or BadDevice naming the tensor, UnsupportedConfig for trunc_bits.
    """
    _check_operands(a, b, trunc_bits)
    if config is None:
        config = ProbeConfig("fp16", block_k=32, num_warps=4)
    shape = (a.shape[0], b.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=a.device)
    else:
        check_dtype("out", out, (torch.float32,))
        check_ndim("out", out, 2, "[M, N]")
        check_size("out", out, 0, shape[0], "M of a")
        check_size("out", out, 1, shape[1], "N of b")
    check_same_device({"a": a, "b": b, "out": out})
    _launch_truncated_matmul(a, b, out, trunc_bits=trunc_bits, config=config)
    return out


def _asm_of(compiled: Any) -> Mapping[str, str]:
    asm = getattr(compiled, "asm", None)
    if asm is None:
        return {}
    texts: dict[str, str] = {}
    for key in ("ptx", "sass"):
        try:
            # `sass` is disassembled from the cubin on first access (Triton's bundled cuobjdump).
            value = asm[key]
        except (KeyError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            logger.debug("no %s for the probe kernel: %s", key, exc)
            continue
        if isinstance(value, str):
            texts[key] = value
    return texts


# Operands span 2**-6 .. 2**6 times a normal sample: block sums of fp8 products (8 significant
# bits each) then need more than fp32's 24 bits, so a full-precision accumulator leaves a
# nonzero low bit somewhere and reads as 23 bits, not fewer.
OPERAND_EXPONENT_SPREAD = 6
# Largest finite float8_e4m3fn.
FP8_E4M3_MAX = 448.0


def probe_operands(
    m: int, n: int, k: int, *, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU operands ``a`` ``[m, k]`` and ``b`` ``[k, n]`` (K-contiguous, as fp8 wgmma wants).

    Values are normal samples scaled by random powers of two (``OPERAND_EXPONENT_SPREAD``),
    rounded to ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    spread = OPERAND_EXPONENT_SPREAD

    def sample(rows: int, cols: int) -> torch.Tensor:
        scale = torch.exp2(torch.randint(-spread, spread + 1, (rows, cols), generator=gen).float())
        values = torch.randn(rows, cols, generator=gen) * scale
        return values.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)

    return sample(m, k), sample(n, k).T


def run_probe(
    config: ProbeConfig,
    *,
    m: int = 256,
    n: int = 256,
    k: int = 1024,
    max_trunc_bits: int = FP32_MANTISSA_BITS,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Sweep N_trun = 0..max_trunc_bits for one configuration on ``[m, k] x [k, n]`` inputs.

    Inputs come from ``probe_operands`` (fp8 products are exact in fp32, so only the
    accumulation rounds).
    Runs on the CUDA device, or on the CPU interpreter when ``TRITON_INTERPRET=1`` (which
    accumulates in full fp32: it measures nothing about hardware).

    Raises DeviceUnavailable when neither is available.
    """
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif triton_interpreter_enabled():
            device = torch.device("cpu")
        else:
            raise DeviceUnavailable("the accumulator probe")
    a, b = probe_operands(m, n, k, dtype=_TORCH_DTYPES[config.dtype], seed=seed)
    a, b = a.to(device), b.to(device)
    _check_operands(a, b, max_trunc_bits)
    check_same_device({"a": a, "b": b})
    base = torch.empty(m, n, dtype=torch.float32, device=device)
    compiled = _launch_truncated_matmul(a, b, base, trunc_bits=0, config=config)
    asm = _asm_of(compiled)
    instruction = matrix_instructions(asm) if asm else "interpreter (no matrix engine)"
    diffs = [0.0]
    out = torch.empty_like(base)
    for trunc_bits in range(1, max_trunc_bits + 1):
        _launch_truncated_matmul(a, b, out, trunc_bits=trunc_bits, config=config)
        diffs.append(float((out - base).abs().max().item()))
    return ProbeResult(config=config, instruction=instruction, max_abs_diff=tuple(diffs))
