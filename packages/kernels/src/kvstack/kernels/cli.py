"""``kvstack-kernels``: the accumulator probe and the kernel benchmarks.

Results (tables, ``--json PATH``) go to stdout and the file; progress and logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvstack.kernels import _bench
from kvstack.kernels.acc_probe import PROBE_DTYPES, format_probe_table, probe_configs
from kvstack.kernels.errors import KernelError

__all__ = ["main"]

logger = logging.getLogger("kvstack.kernels.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstack-kernels",
        description="Triton kernels of kvstack: the accumulator-precision probe and benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = commands.add_parser(
        "probe",
        help="measure the matrix engine's accumulator mantissa bits (PyTorch blog method)",
        description=(
            "Zero the N_trun low mantissa bits of each K block's tl.dot result before fp32 "
            "accumulation, sweep N_trun = 0..23, and print which truncations leave the output "
            "bit-identical, per configuration, with the matrix instruction it compiled to."
        ),
    )
    probe.add_argument(
        "--dtypes",
        nargs="+",
        choices=PROBE_DTYPES,
        default=list(PROBE_DTYPES),
        help="input dtypes (default: all)",
    )
    probe.add_argument(
        "--block-k",
        nargs="+",
        type=int,
        default=[32, 64, 128],
        help="BLOCK_K values: K per isolated tl.dot (default: 32 64 128)",
    )
    probe.add_argument(
        "--warps",
        nargs="+",
        type=int,
        default=[2, 4, 8],
        help="num_warps values; 2 forces mma.sync, 4 and 8 allow wgmma on sm_90 (default: 2 4 8)",
    )
    probe.add_argument(
        "--max-imprecise-acc",
        nargs="+",
        type=int,
        default=[0],
        help="Triton max_num_imprecise_acc values for fp8 (0 = Triton's default; default: 0)",
    )
    probe.add_argument(
        "--no-upcast",
        action="store_true",
        help="skip the rows that convert fp8 operands to fp16 in the kernel",
    )
    probe.add_argument(
        "--shape",
        nargs=3,
        type=int,
        metavar=("M", "N", "K"),
        default=[256, 256, 1024],
        help="matmul shape (default: 256 256 1024)",
    )
    probe.add_argument(
        "--quick",
        action="store_true",
        help="one BLOCK_K (32), 4 warps, a 64x64x128 matmul: a smoke run",
    )
    probe.add_argument("--json", type=Path, metavar="PATH", help="also write kvstack-bench/1 JSON")

    bench = commands.add_parser(
        "bench",
        help="time the kernels against copy bandwidth and torch SDPA (issue 5's cases)",
        description="Run issue 5's benchmarks on the visible GPU, ours and baseline interleaved.",
    )
    bench.add_argument("--json", type=Path, metavar="PATH", help="write kvstack-bench/1 JSON here")
    bench.add_argument(
        "--quick", action="store_true", help="shrink every size: a smoke run of a few seconds"
    )
    bench.add_argument(
        "--cases",
        nargs="+",
        choices=_bench.CASES,
        default=list(_bench.CASES),
        help="which cases to run (default: all)",
    )
    return parser


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", path)


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (Triton interpreter: no hardware numbers)"


def _probe(args: argparse.Namespace) -> int:
    device = _bench.bench_device()
    if args.quick:
        configs = probe_configs(dtypes=args.dtypes, block_ks=(32,), warps=(4,), upcast_fp8=False)
        mnk = (64, 64, 128)
    else:
        configs = probe_configs(
            dtypes=args.dtypes,
            block_ks=args.block_k,
            warps=args.warps,
            max_num_imprecise_accs=args.max_imprecise_acc,
            upcast_fp8=not args.no_upcast,
        )
        mnk = tuple(args.shape)
    results = _bench.run_probe_sweep(configs, mnk=mnk, device=device)
    print(f"accumulator probe on {_card(device)}, {mnk[0]}x{mnk[1]}x{mnk[2]}")
    print(format_probe_table(results))
    if args.json is not None:
        rows = _bench.probe_bench_results(results)
        _write_json(args.json, _bench.bench_document(rows, device=device))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    device = _bench.bench_device()
    results = _bench.run_bench(quick=args.quick, cases=args.cases, device=device)
    print(_bench.format_results(results, card=_card(device)))
    probes = [r for r in results if r.metric == "accumulator_mantissa_bits"]
    if probes:
        print()
        print("probe (mantissa bits kept by the accumulator; 23 = full fp32):")
        for r in probes:
            print(f"  {r.name:<40} e8m{int(r.value):<3} {r.params['instruction']}")
    if args.json is not None:
        _write_json(args.json, _bench.bench_document(results, device=device))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 kernel error, 2 usage)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(message)s",
    )
    try:
        if args.command == "probe":
            return _probe(args)
        return _run_bench(args)
    except KernelError as exc:
        logger.error("kvstack-kernels %s: %s", args.command, exc)
        return 1
