"""The accumulator probe: masking, the analysis, the table, and the kernel on the interpreter.

The interpreter accumulates in full fp32, so it cannot measure a matrix engine; the analysis
is checked against an emulated engine with a known number of mantissa bits instead.
"""

from __future__ import annotations

import pytest
import torch

from kvstack.kernels import BadDtype, BadShape, UnsupportedConfig
from kvstack.kernels.acc_probe import (
    ProbeConfig,
    ProbeResult,
    accumulator_mantissa_bits,
    emulated_engine_matmul,
    format_probe_table,
    mask_low_bits,
    matrix_instructions,
    probe_configs,
    probe_operands,
    run_probe,
    truncated_matmul,
    truncated_matmul_reference,
    truncation_mask,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_truncation_mask_bits() -> None:
    assert truncation_mask(0) == -1  # 0xFFFFFFFF as a signed int32
    assert truncation_mask(1) == -2
    assert truncation_mask(10) & 0xFFFFFFFF == 0xFFFFFC00
    assert truncation_mask(23) & 0xFFFFFFFF == 0xFF800000  # sign and exponent only
    with pytest.raises(ValueError, match="trunc_bits=24"):
        truncation_mask(24)


def test_mask_low_bits_values() -> None:
    x = torch.tensor([1.0 + 2**-23, 1.0 + 2**-10 + 2**-20, -3.0 - 2**-22, 0.0])
    assert mask_low_bits(x, 0).tolist() == x.tolist()
    # 13 bits cleared: 2**-23 and 2**-20 vanish, 2**-10 stays; the sign is untouched.
    assert mask_low_bits(x, 13).tolist() == [1.0, 1.0 + 2**-10, -3.0, 0.0]
    assert mask_low_bits(x, 23).tolist() == [1.0, 1.0, -2.0, 0.0]


# Engines keeping 13 (H100 FP8 per the blog), 10 and 22 mantissa bits, and full fp32.
@pytest.mark.parametrize("mantissa_bits", [13, 10, 22, 23])
def test_analysis_recovers_an_emulated_engine(mantissa_bits: int) -> None:
    # The probe's own fp8 operands: products are exact, only the accumulator rounds.
    a, b = probe_operands(32, 32, 256, dtype=torch.float8_e4m3fn, seed=mantissa_bits)
    a, b = a.float(), b.float()
    base = emulated_engine_matmul(a, b, block_k=64, trunc_bits=0, mantissa_bits=mantissa_bits)
    identical = [
        torch.equal(
            emulated_engine_matmul(a, b, block_k=64, trunc_bits=n, mantissa_bits=mantissa_bits),
            base,
        )
        for n in range(24)
    ]
    assert accumulator_mantissa_bits(identical) == mantissa_bits


def test_analysis_stops_at_the_first_difference() -> None:
    # A later coincidental match must not extend the run.
    assert accumulator_mantissa_bits([True, True, False, True] + [False] * 20) == 22
    assert accumulator_mantissa_bits([True] * 24) == 0


# fp16 operands (the interpreter's dot is exact enough to compare); BLOCK_K 32 and 64, K no
# multiple of either (masked last block); truncations 0, 5 and 12 bits.
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("trunc_bits", [0, 5, 12])
@pytest.mark.parametrize("block_k", [32, 64])
def test_truncated_matmul_matches_reference(block_k: int, trunc_bits: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(48, 200, generator=gen).to(torch.float16).to(DEVICE)
    b = torch.randn(200, 40, generator=gen).to(torch.float16).to(DEVICE)
    out = torch.full((48, 40), float("nan"), device=DEVICE)
    expected = truncated_matmul_reference(a, b, block_k=block_k, trunc_bits=trunc_bits)

    truncated_matmul(a, b, trunc_bits=trunc_bits, config=ProbeConfig("fp16", block_k, 4), out=out)

    # The kernel's block product may differ from the float64 one in its last fp32 bit, which
    # truncation turns into at most one unit of the kept bits per block (7 blocks): 2**(t-23)
    # relative per block, on sums of magnitude ~15.
    tolerance = 7 * 2.0 ** (trunc_bits - 23) * 16
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=0)


def test_truncated_matmul_checks_inputs() -> None:
    a = torch.zeros(4, 32, dtype=torch.float16, device=DEVICE)
    with pytest.raises(BadShape, match=r"b: has shape \[16, 4\]"):
        truncated_matmul(a, torch.zeros(16, 4, dtype=torch.float16, device=DEVICE), trunc_bits=0)
    with pytest.raises(BadDtype, match="b: has dtype float32"):
        truncated_matmul(a, torch.zeros(32, 4, device=DEVICE), trunc_bits=0)
    with pytest.raises(UnsupportedConfig, match="trunc_bits=30"):
        truncated_matmul(a, a.T.contiguous(), trunc_bits=30)


def test_run_probe_on_the_interpreter() -> None:
    """The whole sweep runs; the interpreter keeps every fp32 bit for fp16 products."""
    result = run_probe(ProbeConfig("fp16", 32, 4), m=32, n=32, k=128, device=DEVICE)
    assert len(result.max_abs_diff) == 24
    assert result.max_abs_diff[0] == 0.0
    if DEVICE == "cpu":
        assert result.mantissa_bits == 23
        assert result.instruction.startswith("interpreter")
    else:
        assert result.instruction != "none"


# SASS and PTX fragments as Triton emits them on sm_90 (wgmma) and sm_80 (mma.sync).
SASS_QGMMA = """
        /*0420*/                   QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24, gsb0 ;
        /*0430*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
"""
SASS_HMMA = "        /*0a10*/                   HMMA.16816.F32 R8, R16, R4, RZ ;"
PTX_WGMMA = "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1, %f2}, %rd1, %rd2;"
PTX_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f3};"
PTX_FP8 = "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%f1}, %rd1, %rd2, p, 1, 1;"


@pytest.mark.parametrize(
    ("asm", "expected"),
    [
        ({"sass": SASS_QGMMA, "ptx": PTX_FP8}, "QGMMA.64x64x32.F32.E4M3.E4M3"),
        ({"sass": SASS_HMMA}, "HMMA.16816.F32"),
        # An FMA on the MMA pipe (seen in the page-copy kernel's SASS) is no matrix instruction.
        ({"sass": "--:-:-:-:1\tHFMA2.MMA R7, -RZ, RZ, 0, 0;"}, "none"),
        ({"ptx": PTX_WGMMA}, "HGMMA (ptx wgmma.m64n64k16.f16)"),
        ({"ptx": PTX_FP8}, "QGMMA (ptx wgmma.m64n64k32.e4m3)"),
        ({"ptx": PTX_MMA}, "HMMA (ptx mma.m16n8k16.f16)"),
        ({"sass": "FADD R1, R2, R3 ;", "ptx": "add.f32 %f1, %f2, %f3;"}, "none"),
    ],
)
def test_matrix_instruction_names(asm: dict[str, str], expected: str) -> None:
    assert matrix_instructions(asm) == expected


def test_table_marks_identical_truncations() -> None:
    diffs = (0.0,) * 11 + (1e-3,) * 13  # identical up to N_trun = 10: e8m13
    result = ProbeResult(ProbeConfig("fp8e4m3", 64, 4), "QGMMA.64x64x32", diffs)
    table = format_probe_table([result, ProbeResult(ProbeConfig("fp16", 32, 2), "HMMA", (0.0,))])

    lines = table.splitlines()
    assert lines[1].startswith("N_trun")
    assert lines[2] == "fp8e4m3 K64 w4  " + "=" * 11 + "x" * 13 + "  e8m13   QGMMA.64x64x32"
    assert lines[3].startswith("fp16 K32 w2     =" + " " * 23 + "  e8m23")
    assert result.mantissa_bits == 13
    assert result.to_json()["mantissa_bits"] == 13


def test_sweep_configs() -> None:
    configs = probe_configs()
    labels = [c.label for c in configs]
    # 2 dtypes x 3 BLOCK_K x 3 warp counts, plus the fp8->fp16 rows.
    assert len(configs) == 2 * 3 * 3 + 3 * 3
    assert "fp8e4m3 K128 w8" in labels
    assert "fp8e4m3->fp16 K32 w2" in labels
    capped = probe_configs(dtypes=["fp8e4m3", "fp16"], max_num_imprecise_accs=(0, 32))
    assert "fp8e4m3 K64 w4 imprecise32" in [c.label for c in capped]
    assert not any(c.dtype == "fp16" and c.max_num_imprecise_acc for c in capped)
    with pytest.raises(ValueError, match="block_k=48"):
        ProbeConfig("fp16", 48, 4)
    with pytest.raises(ValueError, match="dtype='bf16'"):
        ProbeConfig("bf16", 32, 4)


@pytest.mark.gpu
def test_probe_names_an_instruction_on_gpu() -> None:
    """On the card: a real instruction and a plausible accumulator (13..23 bits) per dtype."""
    for config in (ProbeConfig("fp8e4m3", 64, 4), ProbeConfig("fp16", 64, 4)):
        result = run_probe(config, device="cuda")
        assert result.instruction != "none", result
        assert 10 <= result.mantissa_bits <= 23, result


@pytest.mark.gpu
def test_truncated_matmul_fp16_on_gpu() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(256, 1024, generator=gen).to("cuda", torch.float16)
    b = torch.randn(1024, 256, generator=gen).to("cuda", torch.float16)
    out = truncated_matmul(a, b, trunc_bits=0, config=ProbeConfig("fp16", 64, 4))
    expected = truncated_matmul_reference(a, b, block_k=64, trunc_bits=0)
    # The engine's accumulator may keep fewer bits than fp32: allow 2**-10 relative per block.
    torch.testing.assert_close(out, expected, atol=16 * 32 * 2.0**-10, rtol=0)
