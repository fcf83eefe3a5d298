"""Compile every kernel, at the configurations the heuristics pick, for a CUDA arch without a GPU.

Catches what the CPU interpreter cannot: Triton compile errors, register spills, shared-memory
use and the matrix instruction each kernel lowers to, read from the SASS. Run it without
``TRITON_INTERPRET`` (kernels must be ``JITFunction``s)::

    python packages/kernels/benchmarks/compile_report.py            # sm_90 (H100/H200)
    python packages/kernels/benchmarks/compile_report.py --arch 80  # A100

Pointers and strides are declared 16-divisible, as Triton specialises aligned launches; the
table shows registers per thread, the spill stack (bytes; 0 is what we want), shared memory
and the matrix opcodes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvstack.kernels._launch import next_power_of_2
from kvstack.kernels.acc_probe import matrix_instructions, probe_configs
from kvstack.kernels.acc_probe._kernel import truncated_matmul_kernel
from kvstack.kernels.cache_write import cache_write_config
from kvstack.kernels.cache_write._kernel import cache_write_kernel
from kvstack.kernels.page_pack import page_copy_config
from kvstack.kernels.page_pack._kernel import page_copy_kernel
from kvstack.kernels.paged_attention import attention_config
from kvstack.kernels.paged_attention._heuristics import REDUCE_CHUNK
from kvstack.kernels.paged_attention._kernel import paged_attention_kernel, reduce_segments_kernel

# Launch-configuration candidates compiled beside the heuristic's (tune_sweep.py times them).
_CANDIDATES: dict[str, list[dict[str, Any]]] = {
    "decode llama b64x4096": [
        {"k_by_key": True},
        {"tile": 128, "num_warps": 8},
        {"k_by_key": True, "prefetch_blocks": True},
        {"tile": 32, "k_by_key": True, "prefetch_blocks": True},
        {"tile": 32, "num_stages": 4, "k_by_key": True, "prefetch_blocks": True},
        {"tile": 32, "k_by_key": True, "prefetch_blocks": True, "unmasked_prefix": True},
        {"tile": 64, "num_stages": 5, "k_by_key": True},
    ],
    "decode llama b1x32K split": [
        {"k_by_key": True, "prefetch_blocks": True},
        {"num_segments": 128, "tile": 32, "k_by_key": True, "prefetch_blocks": True},
        {"num_segments": 256, "tile": 32, "k_by_key": True, "prefetch_blocks": True},
    ],
    "prefill llama 4x4096": [
        {"k_by_key": True},
        {"tile": 128, "num_stages": 3},
        {"k_by_key": True, "prefetch_blocks": True},
        {"k_by_key": True, "unmasked_prefix": True},
    ],
}
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+)")
_PROBE_DTYPES = {"fp8e4m3": "fp8e4nv", "fp16": "fp16"}


def _compile(
    kernel: Any,
    pointer_types: Mapping[str, str],
    constants: Mapping[str, Any],
    *,
    arch: int,
    num_warps: int,
    num_stages: int = 3,
) -> Any:
    signature = {}
    attrs = {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in ("scale", "soft_cap") else "i32"
        if name not in constants and (name.endswith("_ptr") or name.startswith("stride")):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, dict(constants), attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def _row(label: str, compiled: Any) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump), "-res-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    found = _RESOURCES.search(usage)
    regs, stack = found.groups() if found else ("?", "?")
    asm = {"ptx": compiled.asm["ptx"], "sass": compiled.asm["sass"]}
    shared = compiled.metadata.shared
    return f"{label:<52} {regs:>4} {stack:>6} {shared:>8}  {matrix_instructions(asm)}"


def _attention_rows(arch: int, dtype: str) -> list[str]:
    rows = []
    # (label, heads q/kv, head size, max query len, seqs, max seq len, window, soft-cap)
    cases = [
        ("decode llama b64x4096", 32, 8, 128, 1, 64, 4096, 0, False),
        ("decode llama b1x32K split", 32, 8, 128, 1, 1, 32768, 0, False),
        ("prefill llama 4x4096", 32, 8, 128, 4096, 4, 4096, 0, False),
        ("prefill head 64", 32, 8, 64, 4096, 4, 4096, 0, False),
        ("prefill head 256 gqa8 window softcap", 64, 8, 256, 1024, 4, 4096, 1024, True),
        ("decode mqa 32/1 head 64", 32, 1, 64, 1, 64, 4096, 0, False),
    ]
    for label, q_heads, kv_heads, head, max_q, seqs, max_seq, window, cap in cases:
        config = attention_config(
            num_q_heads=q_heads,
            num_kv_heads=kv_heads,
            head_size=head,
            num_seqs=seqs,
            max_query_len=max_q,
            max_seq_len=max_seq,
            num_sms=132,
        )
        pointer = f"*{dtype}"
        pointers = {
            "out_ptr": pointer,
            "query_ptr": pointer,
            "key_cache_ptr": pointer,
            "value_cache_ptr": pointer,
            "segm_out_ptr": "*fp32",
            "segm_max_ptr": "*fp32",
            "segm_expsum_ptr": "*fp32",
            "block_table_ptr": "*i32",
            "seq_lens_ptr": "*i32",
            "query_start_ptr": "*i32",
        }
        constants = {
            "NUM_Q_HEADS": q_heads,
            "Q_PER_KV": q_heads // kv_heads,
            "BLOCK_SIZE": 16,
            "HEAD_SIZE": head,
            "HEAD_SIZE_PADDED": max(next_power_of_2(head), 16),
            "BLOCK_M": config.block_m,
            "BLOCK_Q": config.block_q,
            "TILE": config.tile,
            "SLIDING_WINDOW": window,
            "USE_SOFTCAP": cap,
            "NUM_SEGMENTS": config.num_segments,
            "UPCAST": False,
            "DOT_PRECISION": "tf32",
            "K_BY_KEY": config.k_by_key,
            "PREFETCH_BLOCKS": config.prefetch_blocks,
            "UNMASKED_PREFIX": config.unmasked_prefix,
        }
        # The heuristic's configuration, then the tuning candidates for the Llama cases.
        variants = [config]
        if label in _CANDIDATES:
            variants += [config._replace(**change) for change in _CANDIDATES[label]]
        for variant in variants:
            constants |= {
                "BLOCK_M": variant.block_m,
                "BLOCK_Q": variant.block_q,
                "TILE": variant.tile,
                "NUM_SEGMENTS": variant.num_segments,
                "K_BY_KEY": variant.k_by_key,
                "PREFETCH_BLOCKS": variant.prefetch_blocks,
                "UNMASKED_PREFIX": variant.unmasked_prefix,
            }
            compiled = _compile(
                paged_attention_kernel,
                pointers,
                constants,
                arch=arch,
                num_warps=variant.num_warps,
                num_stages=variant.num_stages,
            )
            shape = (
                f"M{variant.block_m} T{variant.tile} S{variant.num_segments} "
                f"w{variant.num_warps} s{variant.num_stages}{' kT' if variant.k_by_key else ''}"
                f"{' pf' if variant.prefetch_blocks else ''}"
                f"{' um' if variant.unmasked_prefix else ''}"
            )
            rows.append(_row(f"attention {label} ({shape})", compiled))
        if config.num_segments > 1:
            reduce = _compile(
                reduce_segments_kernel,
                {
                    "out_ptr": pointer,
                    "segm_out_ptr": "*fp32",
                    "segm_max_ptr": "*fp32",
                    "segm_expsum_ptr": "*fp32",
                },
                {
                    "NUM_Q_HEADS": q_heads,
                    "HEAD_SIZE": head,
                    "HEAD_SIZE_PADDED": next_power_of_2(head),
                    "NUM_SEGMENTS": config.num_segments,
                    "SEGMENT_CHUNK": min(config.num_segments, REDUCE_CHUNK),
                },
                arch=arch,
                num_warps=4,
            )
            rows.append(_row(f"reduce_segments {label}", reduce))
    return rows


def _copy_rows(arch: int) -> list[str]:
    write = cache_write_config(8, 128)
    words = {name: "*i16" for name in ("key_ptr", "value_ptr", "key_cache_ptr", "value_cache_ptr")}
    rows = [
        _row(
            f"cache_write llama (tile {write.tile})",
            _compile(
                cache_write_kernel,
                {**words, "slot_mapping_ptr": "*i64"},
                {"NUM_KV_HEADS": 8, "HEAD_SIZE": 128, "BLOCK_SIZE": 16, "TILE": write.tile},
                arch=arch,
                num_warps=write.num_warps,
            ),
        )
    ]
    copy = page_copy_config(65536 // 8, 8)  # a 64 KiB Llama page in 8-byte words
    for unpack in (False, True):
        compiled = _compile(
            page_copy_kernel,
            {"cache_ptr": "*i64", "buffer_ptr": "*i64", "block_ids_ptr": "*i64"},
            {
                "PAGE_WORDS": 65536 // 8,
                "TILES_PER_PAGE": copy.tiles_per_page,
                "TILE": copy.tile,
                "UNPACK": unpack,
            },
            arch=arch,
            num_warps=copy.num_warps,
        )
        rows.append(_row(f"page_copy {'unpack' if unpack else 'pack'} 64 KiB pages", compiled))
    return rows


def _probe_rows(arch: int) -> list[str]:
    rows = []
    for config in probe_configs():
        compiled = _compile(
            truncated_matmul_kernel,
            {"a_ptr": f"*{_PROBE_DTYPES[config.dtype]}", "b_ptr": f"*{_PROBE_DTYPES[config.dtype]}"}
            | {"c_ptr": "*fp32"},
            {
                "BLOCK_M": config.block_m,
                "BLOCK_N": config.block_n,
                "BLOCK_K": config.block_k,
                "UPCAST_TO_FP16": config.upcast_to_fp16,
                "MAX_NUM_IMPRECISE_ACC": config.max_num_imprecise_acc,
            },
            arch=arch,
            num_warps=config.num_warps,
        )
        rows.append(_row(f"probe {config.label}", compiled))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the compile report (2 if the interpreter is on)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    parser.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16"], help="attention dtype (default bf16)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the report compiles real kernels", file=sys.stderr)
        return 2
    print(f"sm_{args.arch}, triton {triton.__version__}")
    print(f"{'kernel (config)':<52} {'regs':>4} {'stack':>6} {'shared':>8}  matrix instructions")
    rows = [*_attention_rows(args.arch, args.dtype), *_copy_rows(args.arch)]
    rows += _probe_rows(args.arch)
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
