"""One-shot tuning sweep for issue 5: the current launch configuration beside every candidate.

Runs on one GPU in under 4 minutes, its ~55 Triton compiles included (a budget, ``--budget-s``,
skips the lowest-priority candidates of each case if compiles run slow), or with ``--smoke`` on
the CPU interpreter at tiny sizes (correctness only)::

    PYTHONPATH=packages/kernels/src python packages/kernels/benchmarks/tune_sweep.py --json OUT.json
    TRITON_INTERPRET=1 PYTHONPATH=packages/kernels/src \\
        python packages/kernels/benchmarks/tune_sweep.py --smoke --json /tmp/smoke.json

For every case (decode b64 x 4K, decode b1 x 32K split-KV, prefill 4 x 4K, pack/unpack 512 MiB)
each configuration is first checked against ``reference.py`` (bit-exact for pack/unpack), then
timed three ways:

* ``graph``: median per call of a CUDA graph of many back-to-back calls: GPU time alone, what a
  CUDA-graphed decode step sees. The ratio column uses it.
* ``eager``: ``triton.testing.do_bench`` median (L2 flushed between calls): includes host launch
  overhead whenever the host is slower than the GPU.
* ``host``: wall-clock of the Python call alone (no synchronisation): the launcher's overhead.

The copy-bandwidth baseline (1 GiB device copy) and SDPA (flash) are timed the same ways in the
same run. Every input is larger than L2 (50 MB), and the split-KV case alternates two caches.
Progress goes to stderr, the table to stdout, everything to the JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.testing

from kvstack.kernels.page_pack import _copy as page_copy
from kvstack.kernels.page_pack import pack_pages_reference
from kvstack.kernels.page_pack._heuristics import TILE_BYTES, TILE_WARPS
from kvstack.kernels.paged_attention import (
    AttentionConfig,
    attention_config,
    paged_attention,
    paged_attention_reference,
)

# Llama-3.1-8B attention: 32 query heads, 8 KV heads, head 128; 16-token pages.
NUM_Q_HEADS = 32
NUM_KV_HEADS = 8
HEAD_SIZE = 128
BLOCK_SIZE = 16
GROUP = NUM_Q_HEADS // NUM_KV_HEADS
# The sweep stops starting new candidates after this many seconds (compiles dominate); the
# current configuration of every case always runs first.
DEFAULT_BUDGET_S = 190.0
# Shares of the budget by case (mostly compile time: pack's kernel compiles in a second).
CASE_WEIGHTS = {"split": 3.0, "decode": 3.0, "pack": 1.0, "prefill": 3.0}


@dataclass(frozen=True, slots=True)
class Sizes:
    decode_batch: int
    decode_context: int
    split_context: int
    prefill_seqs: int
    prefill_tokens: int
    pack_layers: int
    pack_pages: int
    copy_bytes: int


FULL = Sizes(64, 4096, 32768, 4, 4096, 32, 256, 1 << 30)
# Smoke prefill of 160 tokens: Q blocks past the first tile walk unmasked tiles (``um``).
SMOKE = Sizes(2, 64, 512, 1, 160, 2, 4, 1 << 20)


def _label(config: AttentionConfig) -> str:
    return (
        f"M{config.block_m} T{config.tile} S{config.num_segments} w{config.num_warps} "
        f"s{config.num_stages}{' kT' if config.k_by_key else ''}"
        f"{' pf' if config.prefetch_blocks else ''}{' um' if config.unmasked_prefix else ''}"
    )


def _c(
    tile: int,
    segments: int,
    warps: int,
    stages: int,
    *,
    k_by_key: bool = True,
    prefetch: bool = False,
    unmasked: bool = False,
    block_m: int = 16,
) -> AttentionConfig:
    return AttentionConfig(
        block_m,
        block_m // GROUP,
        tile,
        segments,
        warps,
        stages,
        k_by_key=k_by_key,
        prefetch_blocks=prefetch,
        unmasked_prefix=unmasked,
    )


# Each list is in priority order: when the time budget runs out, the tail is skipped. "pf"
# (prefetch_blocks) is the candidate expected to matter: without it the sm_90 compile keeps one
# K/V buffer (the block-table -> address chain uses up the stages); with it, 3 stages
# double-buffer. Shared memory (sm_90 compile, bf16, head 128): T32 s3 pf 38 KB, T64 s3 pf
# 72 KB, T64 s4 pf 104 KB, T128 s3 pf 139 KB; an SM has 228 KB, so the bigger ones cost occupancy.
# "um" (unmasked_prefix) drops the causal/bounds masks on tiles before the diagonal: mostly a
# prefill candidate (compute-bound there), cheap elsewhere.


def decode_candidates() -> list[AttentionConfig]:
    """Batch-64 decode (512 programs, about 4 per SM): prefetch, K layout, tile, stages."""
    return [
        _c(64, 1, 4, 3, prefetch=True),
        _c(32, 1, 4, 3, prefetch=True),
        _c(32, 1, 4, 4, prefetch=True),
        _c(32, 1, 4, 3, prefetch=True, unmasked=True),
        _c(64, 1, 4, 3),
        _c(128, 1, 8, 3, k_by_key=False),  # the old sweep's best
        _c(64, 1, 4, 3, k_by_key=False, prefetch=True),
        _c(64, 1, 8, 3, prefetch=True),
        _c(64, 1, 4, 4, prefetch=True),
        _c(64, 1, 4, 5),
        _c(128, 1, 8, 3, prefetch=True),
        _c(32, 1, 2, 4, prefetch=True),
    ]


def split_candidates() -> list[AttentionConfig]:
    """Batch-1 x 32K decode: prefetch, K layout, segments (up to 256), tile, warps, stages."""
    return [
        _c(64, 32, 4, 3, prefetch=True),
        _c(64, 32, 4, 3),
        _c(64, 64, 4, 3, prefetch=True),
        _c(32, 128, 4, 3, prefetch=True),
        _c(32, 128, 4, 3, prefetch=True, unmasked=True),
        _c(32, 64, 4, 4, prefetch=True),
        _c(64, 128, 4, 3, prefetch=True),
        _c(32, 256, 4, 3, prefetch=True),
        _c(64, 64, 4, 3, k_by_key=False),  # the old sweep's best
        _c(32, 128, 2, 3, prefetch=True),
        _c(64, 32, 4, 4, prefetch=True),
        _c(128, 64, 8, 3, prefetch=True),
        _c(16, 256, 2, 4, prefetch=True),
    ]


def prefill_candidates() -> list[AttentionConfig]:
    """4 x 4K prefill (current: M128 T64 w8 s2): K layout, prefetch, tile, stages, Q rows."""
    return [
        _c(64, 1, 8, 2, block_m=128),
        _c(64, 1, 8, 2, block_m=128, unmasked=True),
        _c(64, 1, 8, 2, block_m=128, k_by_key=False, unmasked=True),
        _c(64, 1, 8, 3, block_m=128, prefetch=True, unmasked=True),
        _c(64, 1, 8, 3, block_m=128, prefetch=True),
        _c(64, 1, 8, 3, block_m=128, k_by_key=False),
        _c(64, 1, 8, 2, block_m=128, prefetch=True),
        _c(128, 1, 8, 2, block_m=128, unmasked=True),
        _c(32, 1, 4, 3, block_m=128),
        _c(64, 1, 4, 3, block_m=64, prefetch=True),
    ]


# Page copy: (bytes per program, warps); None warps = the heuristic's.
PACK_CANDIDATES: list[tuple[int, int | None]] = [
    (16384, 8),
    (32768, 8),
    (65536, 8),
    (65536, 16),
    (8192, 4),
    (4096, 4),
]
PACK_CURRENT: tuple[int, int | None] = (TILE_BYTES, None)  # the heuristic's warps


@dataclass(slots=True)
class Row:
    case: str
    config: str
    current: bool
    graph_us: float | None = None
    graph_p20_us: float | None = None
    graph_p80_us: float | None = None
    eager_us: float | None = None
    host_us: float | None = None
    ratio: float | None = None
    ratio_eager: float | None = None
    max_err: float | None = None
    ok: bool = False
    note: str = ""


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Timer:
    """Times callables on CUDA (graph, eager, host) or does nothing on the interpreter."""

    def __init__(
        self, *, cuda: bool, started: float, budget_s: float, cases: Sequence[str]
    ) -> None:
        self.cuda = cuda
        self.deadline = started + budget_s
        self.cases_left = list(cases)
        self.case_deadline = self.deadline

    def start_case(self, name: str) -> None:
        """Give the case starting now its weighted share of the time left (unused time carries)."""
        now = time.monotonic()
        weights = sum(CASE_WEIGHTS[c] for c in self.cases_left)
        share = CASE_WEIGHTS[name] / weights
        self.case_deadline = now + max(self.deadline - now, 0.0) * share
        self.cases_left.remove(name)

    def over_budget(self) -> bool:
        return time.monotonic() > self.case_deadline

    def eager_us(self, fn: Callable[[], object]) -> float:
        median_ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        if not isinstance(median_ms, float | int):
            raise TypeError(f"do_bench returned {median_ms!r}, expected milliseconds")
        return float(median_ms) * 1e3

    def graph_us(self, fn: Callable[[], object], estimate_us: float) -> tuple[float, float, float]:
        """Per-call median, p20, p80 over replays of a graph of back-to-back calls."""
        calls = max(4, min(400, int(20_000 / max(estimate_us, 1.0))))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(10):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        cuts = statistics.quantiles(samples, n=10, method="inclusive")
        return statistics.median(samples), cuts[1], cuts[7]

    def host_us(self, fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(20):
            torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e6)
        torch.cuda.synchronize()
        return statistics.median(samples)

    def time_row(self, row: Row, fn: Callable[[], object]) -> None:
        if not self.cuda:
            return
        row.eager_us = self.eager_us(fn)
        row.graph_us, row.graph_p20_us, row.graph_p80_us = self.graph_us(fn, row.eager_us)
        row.host_us = self.host_us(fn)


def _close(
    out: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> tuple[float, bool]:
    diff = (out.float() - expected.float()).abs()
    ok = bool(torch.all(diff <= atol + rtol * expected.float().abs()).item())
    return float(diff.nan_to_num(float("inf")).max().item()), ok


def _decode_inputs(
    batch: int, context: int, *, dtype: torch.dtype, device: torch.device, copies: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    pages = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * pages
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    caches = [
        (
            torch.randn(shape, device=device, dtype=dtype),
            torch.randn(shape, device=device, dtype=dtype),
        )
        for _ in range(copies)
    ]
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = order.view(batch, pages).to(device)
    query = torch.randn(batch, NUM_Q_HEADS, HEAD_SIZE, generator=gen).to(device, dtype)
    return {
        "query": query,
        "caches": caches,
        "block_table": block_table,
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=device),
        "query_start": torch.arange(batch + 1, dtype=torch.int32, device=device),
    }


def _attention_case(
    case: str,
    *,
    inputs: dict[str, Any],
    max_query_len: int,
    max_seq_len: int,
    configs: Sequence[AttentionConfig],
    current: AttentionConfig,
    baseline_us: tuple[float | None, float | None],
    bytes_moved: int | None,
    copy_gbps: tuple[float, float] | None,
    tolerance: tuple[float, float],
    timer: Timer,
) -> list[Row]:
    """Check then time the current configuration and each candidate on the same inputs.

    Ratio: for decode (``bytes_moved``), time at copy bandwidth over ours; for prefill, SDPA's
    time (``baseline_us``) over ours; both higher is better.
    """
    query = inputs["query"]
    caches = inputs["caches"]
    args = {k: inputs[k] for k in ("block_table", "seq_lens", "query_start")}
    expected = paged_attention_reference(query, caches[0][0], caches[0][1], **args)
    out = torch.empty_like(query)
    rows = []
    for index, config in enumerate([current, *[c for c in configs if c != current]]):
        row = Row(case, _label(config), current=index == 0)
        rows.append(row)
        if index > 0 and timer.over_budget():
            row.note = "skipped: time budget"
            continue
        turn = [0]

        def run(config: AttentionConfig = config, turn: list[int] = turn) -> object:
            key_cache, value_cache = caches[turn[0] % len(caches)]
            turn[0] += 1
            return paged_attention(
                query,
                key_cache,
                value_cache,
                max_query_len=max_query_len,
                max_seq_len=max_seq_len,
                config=config,
                out=out,
                **args,
            )

        try:
            began = time.monotonic()
            out.fill_(float("nan"))
            paged_attention(
                query,
                caches[0][0],
                caches[0][1],
                max_query_len=max_query_len,
                max_seq_len=max_seq_len,
                config=config,
                out=out,
                **args,
            )
            row.max_err, row.ok = _close(out, expected, *tolerance)
            _log(
                f"{case} {row.config}: first call {time.monotonic() - began:.1f}s, "
                f"max err {row.max_err:.3g}{'' if row.ok else ' FAIL'}"
            )
            if not row.ok:
                row.note = "wrong result: not timed"
                continue
            timer.time_row(row, run)
        except Exception as exc:  # a compile or launch failure is a result of the sweep
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            _log(f"{case} {row.config}: {row.note}")
            continue
        if row.graph_us is not None and row.eager_us is not None:
            if bytes_moved is not None and copy_gbps is not None:
                row.ratio = bytes_moved / (copy_gbps[0] * 1e3) / row.graph_us
                row.ratio_eager = bytes_moved / (copy_gbps[1] * 1e3) / row.eager_us
            elif baseline_us[0] is not None and baseline_us[1] is not None:
                row.ratio = baseline_us[0] / row.graph_us
                row.ratio_eager = baseline_us[1] / row.eager_us
    return rows


@contextlib.contextmanager
def _flash_only(device: torch.device) -> Generator[str]:
    if device.type != "cuda":
        yield "default (cpu)"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415 (CUDA only)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        yield "flash"


def _prefill_inputs(
    seqs: int, tokens: int, *, dtype: torch.dtype, device: torch.device
) -> tuple[dict[str, Any], Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(seqs, NUM_Q_HEADS, tokens, HEAD_SIZE, generator=gen).to(device, dtype)
    k = torch.randn(seqs, NUM_KV_HEADS, tokens, HEAD_SIZE, generator=gen).to(device, dtype)
    v = torch.randn(seqs, NUM_KV_HEADS, tokens, HEAD_SIZE, generator=gen).to(device, dtype)
    k_full = k.repeat_interleave(GROUP, dim=1).contiguous()
    v_full = v.repeat_interleave(GROUP, dim=1).contiguous()
    pages = tokens // BLOCK_SIZE
    block_table = torch.randperm(seqs * pages, generator=gen).view(seqs, pages).to(torch.int32)
    cache_shape = (seqs * pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache = torch.empty(cache_shape, dtype=dtype, device=device)
    value_cache = torch.empty_like(key_cache)
    paged = (seqs, pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache[block_table.long().to(device)] = k.permute(0, 2, 1, 3).reshape(paged)
    value_cache[block_table.long().to(device)] = v.permute(0, 2, 1, 3).reshape(paged)
    query = q.permute(0, 2, 1, 3).reshape(seqs * tokens, NUM_Q_HEADS, HEAD_SIZE).contiguous()
    inputs = {
        "query": query,
        "caches": [(key_cache, value_cache)],
        "block_table": block_table.to(device),
        "seq_lens": torch.full((seqs,), tokens, dtype=torch.int32, device=device),
        "query_start": torch.arange(0, seqs * tokens + 1, tokens, dtype=torch.int32, device=device),
    }

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    return inputs, sdpa


def _time_baseline(timer: Timer, fn: Callable[[], object]) -> tuple[float | None, float | None]:
    """(graph, eager) microseconds of a baseline, None on the interpreter."""
    if not timer.cuda:
        return None, None
    eager = timer.eager_us(fn)
    graph, _, _ = timer.graph_us(fn, eager)
    return graph, eager


def _pack_rows(
    sizes: Sizes, *, device: torch.device, copy_gbps: tuple[float, float] | None, timer: Timer
) -> list[Row]:
    layers, num_pages = sizes.pack_layers, sizes.pack_pages
    page = (2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)  # K and V of one page: 64 KiB in bf16
    gen = torch.Generator().manual_seed(2)
    num_blocks = 2 * num_pages
    kv_cache = torch.empty((layers, num_blocks, *page), dtype=torch.bfloat16, device=device)
    kv_cache.view(torch.int16).random_()
    block_ids = torch.randperm(num_blocks, generator=gen)[:num_pages].to(device)
    buffer = torch.empty((layers, num_pages, *page), dtype=torch.bfloat16, device=device)
    num_bytes = buffer.numel() * buffer.element_size()
    expected = pack_pages_reference(kv_cache, block_ids)
    rows = []
    current = (TILE_BYTES, TILE_WARPS)
    candidates = [c for c in PACK_CANDIDATES if c != current]
    for index, (tile_bytes, warps) in enumerate([PACK_CURRENT, *candidates]):
        for unpack in (False, True):
            label = f"tile {tile_bytes // 1024}KiB w{warps if warps is not None else TILE_WARPS}"
            row = Row(f"{'unpack' if unpack else 'pack'} 512MiB", label, current=index == 0)
            rows.append(row)
            if index > 0 and timer.over_budget():
                row.note = "skipped: time budget"
                continue

            def run(
                unpack: bool = unpack, tile_bytes: int = tile_bytes, warps: int | None = warps
            ) -> None:
                page_copy(
                    kv_cache,
                    buffer,
                    block_ids,
                    unpack=unpack,
                    tile_bytes=tile_bytes,
                    num_warps=warps,
                )

            try:
                if unpack:
                    # Scatter a known buffer into a zeroed cache; the packed pages must return.
                    saved = kv_cache.clone()
                    buffer.copy_(expected)
                    kv_cache.zero_()
                    run()
                    ok = torch.equal(
                        kv_cache[:, block_ids].view(torch.int16), expected.view(torch.int16)
                    )
                    kv_cache.copy_(saved)
                    del saved
                else:
                    buffer.fill_(float("nan"))
                    run()
                    ok = torch.equal(buffer.view(torch.int16), expected.view(torch.int16))
                row.ok, row.max_err = ok, 0.0 if ok else float("inf")
                if not ok:
                    row.note = "not bit-exact: not timed"
                    continue
                timer.time_row(row, run)
            except Exception as exc:  # a compile or launch failure is a result of the sweep
                row.note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                _log(f"{row.case} {label}: {row.note}")
                continue
            if row.graph_us is not None and row.eager_us is not None and copy_gbps is not None:
                row.ratio = 2 * num_bytes / (row.graph_us * 1e3) / copy_gbps[0]
                row.ratio_eager = 2 * num_bytes / (row.eager_us * 1e3) / copy_gbps[1]
            _log(f"{row.case} {label}: graph {row.graph_us} us")
    return rows


def _format(rows: Sequence[Row], header_lines: Sequence[str]) -> str:
    lines = list(header_lines)
    head = (
        f"{'case':<22} {'config':<28} {'graph us':>9} {'p20-p80':>13} {'eager us':>9} "
        f"{'host us':>8} {'ratio':>6} {'r.eager':>7} {'max err':>8}  note"
    )
    lines += [head, "-" * len(head)]

    def num(value: float | None, width: int, fmt: str = ".1f") -> str:
        return f"{value:{width}{fmt}}" if value is not None else " " * (width - 1) + "-"

    for r in rows:
        spread = (
            f"{r.graph_p20_us:6.1f}-{r.graph_p80_us:<6.1f}"
            if r.graph_p20_us is not None and r.graph_p80_us is not None
            else " " * 12 + "-"
        )
        mark = "*" if r.current else " "
        note = r.note or ("" if r.ok else "FAIL")
        lines.append(
            f"{r.case:<22} {mark}{r.config:<27} {num(r.graph_us, 9)} {spread:>13} "
            f"{num(r.eager_us, 9)} {num(r.host_us, 8)} {num(r.ratio, 6, '.3f')} "
            f"{num(r.ratio_eager, 7, '.3f')} {num(r.max_err, 8, '.1e')}  {note}"
        )
    lines.append(
        "* = current default. ratio: decode = time at copy bandwidth / ours; prefill = SDPA / "
        "ours; pack = our GB/s / copy GB/s (graph timings; r.eager: do_bench). Higher is better."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", required=True, help="path of the JSON results file to write")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, correctness only (for the CPU interpreter: TRITON_INTERPRET=1)",
    )
    parser.add_argument(
        "--cases",
        default="decode,split,prefill,pack",
        help="comma-separated subset of decode,split,prefill,pack (default all)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"stop starting candidates after this many seconds (default {DEFAULT_BUDGET_S:g})",
    )
    args = parser.parse_args(argv)
    cases = set(args.cases.split(","))
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("no CUDA device: use --smoke with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    sizes = FULL if cuda else SMOKE
    # bf16 on the GPU; the interpreter computes in fp16 (its bf16 needs the launcher's upcast).
    dtype = torch.bfloat16 if cuda else torch.float16
    tolerance = (1.5e-2, 1.5e-2) if dtype == torch.bfloat16 else (2e-3, 2e-3)
    order = [c for c in ("split", "decode", "pack", "prefill") if c in cases]
    # The interpreter is slow but the smoke run must reach every candidate: no budget there.
    budget_s = args.budget_s if cuda else float("inf")
    timer = Timer(cuda=cuda, started=started, budget_s=budget_s, cases=order)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 132
    card = torch.cuda.get_device_name(device) if cuda else "CPU interpreter"
    _log(f"{card}, torch {torch.__version__}, triton {triton.__version__}")

    copy_gbps: tuple[float, float] | None = None
    copy_us: tuple[float | None, float | None] = (None, None)
    if cuda:
        src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_us = _time_baseline(timer, lambda: dst.copy_(src))
        if copy_us[0] is not None and copy_us[1] is not None:
            copy_gbps = (
                2 * sizes.copy_bytes / (copy_us[0] * 1e3),
                2 * sizes.copy_bytes / (copy_us[1] * 1e3),
            )
        del src, dst
        _log(f"copy 1 GiB: graph {copy_us[0]:.1f} us, eager {copy_us[1]:.1f} us")

    def heuristic(seqs: int, max_q: int, max_seq: int) -> AttentionConfig:
        return attention_config(
            num_q_heads=NUM_Q_HEADS,
            num_kv_heads=NUM_KV_HEADS,
            head_size=HEAD_SIZE,
            num_seqs=seqs,
            max_query_len=max_q,
            max_seq_len=max_seq,
            num_sms=num_sms,
        )

    rows: list[Row] = []
    elem = torch.finfo(dtype).bits // 8
    sdpa_us: tuple[float | None, float | None] = (None, None)
    sdpa_backend = None

    def decode(name: str) -> list[Row]:
        batch, context, candidates = (
            (sizes.decode_batch, sizes.decode_context, decode_candidates())
            if name == "decode"
            else (1, sizes.split_context, split_candidates())
        )
        # The interpreter's nominal single SM never splits: the smoke run uses the H200's 132.
        current = heuristic(batch, 1, context)
        # Two copies of the 134 MB split-KV cache (L2 holds 50 MB); decode's 1 GiB is one.
        copies = 2 if name == "split" and cuda else 1
        inputs = _decode_inputs(batch, context, dtype=dtype, device=device, copies=copies)
        bytes_moved = (
            2 * batch * context * NUM_KV_HEADS * HEAD_SIZE * elem
            + 2 * batch * NUM_Q_HEADS * HEAD_SIZE * elem
            + batch * math.ceil(context / BLOCK_SIZE) * 4
        )
        return _attention_case(
            f"{name} b{batch}x{context}",
            inputs=inputs,
            max_query_len=1,
            max_seq_len=context,
            configs=candidates,
            current=current,
            baseline_us=(None, None),
            bytes_moved=bytes_moved,
            copy_gbps=copy_gbps,
            tolerance=tolerance,
            timer=timer,
        )

    def prefill() -> list[Row]:
        nonlocal sdpa_us, sdpa_backend
        inputs, sdpa = _prefill_inputs(
            sizes.prefill_seqs, sizes.prefill_tokens, dtype=dtype, device=device
        )
        try:
            with _flash_only(device) as sdpa_backend:
                sdpa_us = _time_baseline(timer, sdpa)
        except RuntimeError as exc:  # no flash kernel here: time the default backend
            _log(f"SDPA flash unavailable ({exc}); timing the default backend")
            sdpa_backend = "default"
            sdpa_us = _time_baseline(timer, sdpa)
        _log(f"SDPA ({sdpa_backend}): graph {sdpa_us[0]} us, eager {sdpa_us[1]} us")
        return _attention_case(
            f"prefill {sizes.prefill_seqs}x{sizes.prefill_tokens}",
            inputs=inputs,
            max_query_len=sizes.prefill_tokens,
            max_seq_len=sizes.prefill_tokens,
            configs=prefill_candidates(),
            current=heuristic(sizes.prefill_seqs, sizes.prefill_tokens, sizes.prefill_tokens),
            baseline_us=sdpa_us,
            bytes_moved=None,
            copy_gbps=None,
            tolerance=tolerance,
            timer=timer,
        )

    def report(*, final: bool) -> None:
        """Write the JSON (after every case, so a run cut short keeps what it measured)."""
        elapsed = time.monotonic() - started
        document = {
            "schema": "kvstack-tune-sweep/1",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "complete": final,
            "card": card,
            "smoke": not cuda,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "triton": triton.__version__,
            },
            "elapsed_s": elapsed,
            "copy_us": {"graph": copy_us[0], "eager": copy_us[1]},
            "copy_GBps": {"graph": copy_gbps[0], "eager": copy_gbps[1]} if copy_gbps else None,
            "sdpa_us": {"graph": sdpa_us[0], "eager": sdpa_us[1], "backend": sdpa_backend},
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        header = [
            f"tune_sweep on {card}: torch {torch.__version__}, triton {triton.__version__}, "
            f"{elapsed:.0f} s{'' if final else ' (so far)'}",
        ]
        if copy_gbps is not None:
            header.append(
                f"copy bandwidth (1 GiB): graph {copy_gbps[0]:.0f} GB/s, "
                f"eager {copy_gbps[1]:.0f} GB/s"
            )
        if sdpa_us[0] is not None:
            header.append(
                f"SDPA {sdpa_backend}: graph {sdpa_us[0]:.1f} us, eager {sdpa_us[1]:.1f} us"
            )
        # The table so far goes to stderr after each case, the final one to stdout.
        print(_format(rows, header), file=sys.stdout if final else sys.stderr, flush=True)

    for name in order:
        timer.start_case(name)
        _log(f"case {name}")
        if name in ("decode", "split"):
            rows += decode(name)
        elif name == "prefill":
            rows += prefill()
        else:
            rows += _pack_rows(sizes, device=device, copy_gbps=copy_gbps, timer=timer)
        if cuda:
            torch.cuda.empty_cache()
        if name != order[-1]:
            report(final=False)
    report(final=True)
    failed = [r for r in rows if r.current and not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
