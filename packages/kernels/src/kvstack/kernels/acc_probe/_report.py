"""Reading the probe's results: the matrix instruction, the effective bits, the table."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvstack.kernels.acc_probe._heuristics import ProbeConfig
from kvstack.kernels.acc_probe.reference import FP32_MANTISSA_BITS

__all__ = [
    "ProbeResult",
    "accumulator_mantissa_bits",
    "format_probe_table",
    "matrix_instructions",
]

# SASS matrix opcodes with their shape/type suffixes: HMMA.16816.F32, QGMMA.64x64x32.F32.E4M3...,
# HGMMA, IMMA, and Blackwell's UTC*MMA. An opcode starts after whitespace or a predicate, never
# after a dot: `HFMA2.MMA` is an FMA issued on the MMA pipe, not a matrix instruction.
_SASS_MMA = re.compile(r"(?<![.\w])([A-Z]+MMA)\b((?:\.[0-9A-Za-z]+)*)")
# PTX: wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 / mma.sync.aligned.m16n8k16....
_PTX_WGMMA = re.compile(r"wgmma\.mma_async(?:\.sync)?(?:\.aligned)?\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)")
_PTX_MMA = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)(?:\.row\.col)?\.(\w+)\.(\w+)")
_FP8_TYPES = ("e4m3", "e5m2")


def matrix_instructions(asm: Mapping[str, str]) -> str:
    """The matrix instructions a compiled kernel uses, e.g. ``QGMMA.64x64x32.F32.E4M3.E4M3``.

    Reads SASS when ``asm`` has it, else PTX (named with the SASS opcode it becomes, marked
    ``(ptx)``); ``none`` when neither shows a matrix instruction.
    """
    sass = asm.get("sass", "")
    found = sorted({op + suffix for op, suffix in _SASS_MMA.findall(sass)})
    if found:
        return ", ".join(found)
    ptx = asm.get("ptx", "")
    names = set()
    for shape, _acc, a_type in _PTX_WGMMA.findall(ptx):
        opcode = "QGMMA" if a_type in _FP8_TYPES else "HGMMA"
        names.add(f"{opcode} (ptx wgmma.{shape}.{a_type})")
    for shape, _acc, a_type in _PTX_MMA.findall(ptx):
        opcode = "QMMA" if a_type in _FP8_TYPES else "HMMA"
        names.add(f"{opcode} (ptx mma.{shape}.{a_type})")
    return ", ".join(sorted(names)) if names else "none"


def accumulator_mantissa_bits(identical: Sequence[bool]) -> int:
    """Mantissa bits the engine kept, from ``identical[n]``: truncating n bits changed nothing.

    An engine keeping m bits leaves ``23 - m`` low zero bits in each product, so every
    ``n <= 23 - m`` is identical to ``n = 0`` and ``n = 24 - m`` is not: m is 23 minus the
    length of the identical run after ``n = 0``.
    """
    run = 0
    for same in identical[1:]:
        if not same:
            break
        run += 1
    return FP32_MANTISSA_BITS - run


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One configuration's sweep: ``max_abs_diff[n]`` vs ``n = 0`` for N_trun = n."""

    config: ProbeConfig
    instruction: str
    max_abs_diff: tuple[float, ...]

    @property
    def identical(self) -> tuple[bool, ...]:
        """Whether each truncation left the output bit-identical to N_trun = 0."""
        return tuple(diff == 0.0 for diff in self.max_abs_diff)

    @property
    def mantissa_bits(self) -> int:
        """Effective accumulator mantissa bits (23 = full fp32)."""
        return accumulator_mantissa_bits(self.identical)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready record (the bench writes one per configuration)."""
        return {
            "config": self.config.label,
            "dtype": self.config.dtype,
            "block_k": self.config.block_k,
            "num_warps": self.config.num_warps,
            "upcast_to_fp16": self.config.upcast_to_fp16,
            "max_num_imprecise_acc": self.config.max_num_imprecise_acc,
            "instruction": self.instruction,
            "mantissa_bits": self.mantissa_bits,
            "max_abs_diff": list(self.max_abs_diff),
        }


def format_probe_table(results: Sequence[ProbeResult]) -> str:
    """The blog's table: a row per configuration, a column per N_trun (``=`` identical, ``x`` not).

    Ends each row with the effective accumulator format (``e8m13``) and the instruction.
    """
    if not results:
        return "(no probe results)"
    width = max(len(r.max_abs_diff) for r in results)
    label_width = max(len("N_trun"), *(len(r.config.label) for r in results))
    # Two header rows spell each column's N_trun vertically: tens, then units.
    tens = "".join(str(n // 10) if n >= 10 else " " for n in range(width))
    units = "".join(str(n % 10) for n in range(width))
    lines = [
        f"{'':<{label_width}}  {tens}  acc     instruction",
        f"{'N_trun':<{label_width}}  {units}",
    ]
    for result in results:
        marks = "".join("=" if same else "x" for same in result.identical)
        lines.append(
            f"{result.config.label:<{label_width}}  {marks:<{width}}  "
            f"e8m{result.mantissa_bits:<3}  {result.instruction}"
        )
    lines.append("'=': output bit-identical to N_trun = 0; acc: effective accumulator format")
    return "\n".join(lines)
