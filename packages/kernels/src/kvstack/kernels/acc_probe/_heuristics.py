"""The probe's sweep: which configurations to run, as pure data."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PROBE_DTYPES", "ProbeConfig", "probe_configs"]

# Input dtypes of the table, as named on the command line.
PROBE_DTYPES = ("fp8e4m3", "fp16")


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """One row of the probe table: input dtype, tile shape, warps, imprecise-accumulation cap.

    ``upcast_to_fp16`` converts fp8 operands to fp16 in the kernel (the FP16 engine on fp8
    data); ``max_num_imprecise_acc`` 0 keeps Triton's default (on sm_90 fp8 the whole dot stays
    in the engine's accumulator); 32/64/128 promote to fp32 every that many K.
    """

    dtype: str
    block_k: int
    num_warps: int
    block_m: int = 64
    block_n: int = 64
    upcast_to_fp16: bool = False
    max_num_imprecise_acc: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in PROBE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(PROBE_DTYPES)}")
        for name in ("block_k", "block_m", "block_n"):
            value = getattr(self, name)
            # tl.dot needs every dimension >= 16, and Triton tiles are powers of two.
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")

    @property
    def label(self) -> str:
        """``fp8e4m3 K64 w4``, plus ``->fp16`` and ``imprecise32`` when set."""
        parts = [self.dtype + ("->fp16" if self.upcast_to_fp16 else ""), f"K{self.block_k}"]
        parts.append(f"w{self.num_warps}")
        if self.max_num_imprecise_acc:
            parts.append(f"imprecise{self.max_num_imprecise_acc}")
        return " ".join(parts)


def probe_configs(
    *,
    dtypes: Sequence[str] = PROBE_DTYPES,
    block_ks: Sequence[int] = (32, 64, 128),
    warps: Sequence[int] = (2, 4, 8),
    max_num_imprecise_accs: Sequence[int] = (0,),
    upcast_fp8: bool = True,
) -> list[ProbeConfig]:
    """The sweep, dtype-major: every dtype x BLOCK_K x warps x imprecise-accumulation cap.

    Warps: 4 and 8 are one and two warpgroups, so sm_90 picks wgmma (QGMMA for fp8, HGMMA for
    fp16); 2 warps cannot form a warpgroup, so Triton falls back to mma.sync (HMMA), converting
    fp8 to fp16 first: the "rare situations" of the blog, made deliberate. With
    ``upcast_fp8``, fp8 rows are repeated with operands converted to fp16 in the kernel.
    """
    configs = []
    for dtype, block_k, num_warps, imprecise in itertools.product(
        dtypes, block_ks, warps, max_num_imprecise_accs
    ):
        if imprecise and dtype != "fp8e4m3":
            continue  # Triton applies the cap to fp8 dots only
        configs.append(ProbeConfig(dtype, block_k, num_warps, max_num_imprecise_acc=imprecise))
    if upcast_fp8 and "fp8e4m3" in dtypes:
        for block_k, num_warps in itertools.product(block_ks, warps):
            configs.append(ProbeConfig("fp8e4m3", block_k, num_warps, upcast_to_fp16=True))
    return configs
