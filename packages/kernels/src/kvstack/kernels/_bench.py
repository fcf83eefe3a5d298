"""``kvstack-kernels bench``: our kernels and their baselines, interleaved, in one process.

Each case times ours and its baseline on the same inputs, alternating one call of each after a
warm-up, and reports medians with p20/p80. Results follow the ``kvstack-bench/1`` schema
(tools/bench/SCHEMA.md). Cases, from issue 5:

* decode, Llama-3.1-8B shapes (32 query / 8 KV heads, head 128, bf16, page 16), batch 64 x
  context 4096: time per layer; ratio = achieved bytes/s over the device copy bandwidth measured
  in the same run (target 0.85);
* decode, batch 1 x 32K (split-KV): same ratio (target 0.7);
* prefill, 4 x 4K tokens vs ``scaled_dot_product_attention`` on the same keys laid out
  contiguously (flash path): ratio = SDPA time / ours (target 0.8);
* pack and unpack of a 512 MiB request (32 layers x 256 pages of 64 KiB): bytes/s over the
  copy bandwidth (target 0.8);
* the accumulator probe: effective mantissa bits per configuration, and its instruction.

``quick=True`` shrinks every size so a smoke run takes seconds (on the CPU interpreter too).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from kvstack.kernels._env import triton_interpreter_enabled
from kvstack.kernels.acc_probe import ProbeConfig, ProbeResult, probe_configs, run_probe
from kvstack.kernels.errors import DeviceUnavailable
from kvstack.kernels.page_pack import pack_pages, unpack_pages
from kvstack.kernels.paged_attention import AttentionConfig, attention_config, paged_attention

__all__ = [
    "CASES",
    "BenchResult",
    "Timing",
    "bench_document",
    "format_results",
    "probe_bench_results",
    "run_bench",
    "run_probe_sweep",
    "time_interleaved",
]

logger = logging.getLogger(__name__)

SCHEMA = "kvstack-bench/1"
SUITE = "kernels"
CASES = ("decode", "split", "prefill", "pack", "probe")

# Llama-3.1-8B attention: 32 query heads, 8 KV heads, head 128; bf16 cache, 16-token pages.
NUM_Q_HEADS = 32
NUM_KV_HEADS = 8
HEAD_SIZE = 128
BLOCK_SIZE = 16
NUM_LAYERS = 32


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call: median and the 20th/80th percentiles."""

    median_s: float
    p20_s: float
    p80_s: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        """Summarise per-call samples in seconds."""
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0])
        cuts = statistics.quantiles(samples, n=10, method="inclusive")
        return cls(statistics.median(samples), cuts[1], cuts[7])


# Mantissa bits of an fp32 accumulator: the probe's reference precision.
FP32_MANTISSA_BITS = 23


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One row of the schema's ``results``."""

    name: str
    metric: str
    unit: str
    value: float
    baseline_name: str
    baseline_value: float
    ratio: float
    higher_is_better: bool
    target: float | None
    params: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The schema's result object."""
        baseline = {"name": self.baseline_name, "value": self.baseline_value}
        return {
            "name": self.name,
            "metric": self.metric,
            "unit": self.unit,
            "value": self.value,
            "baseline": baseline,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "limit": None,
            "params": self.params,
        }


@dataclass(frozen=True, slots=True)
class _Sizes:
    decode_batch: int
    decode_context: int
    split_context: int
    prefill_seqs: int
    prefill_tokens: int
    pack_layers: int
    pack_pages: int
    copy_bytes: int
    warmup: int
    repeats: int
    probe_mnk: tuple[int, int, int]


FULL = _Sizes(
    decode_batch=64,
    decode_context=4096,
    split_context=32768,
    prefill_seqs=4,
    prefill_tokens=4096,
    pack_layers=NUM_LAYERS,
    pack_pages=256,  # 4096 tokens / 16 per page: 32 x 256 x 64 KiB = 512 MiB
    copy_bytes=1 << 30,
    warmup=5,
    repeats=30,
    probe_mnk=(256, 256, 1024),
)
QUICK = _Sizes(
    decode_batch=4,
    decode_context=256,
    split_context=1024,
    prefill_seqs=2,
    prefill_tokens=128,
    pack_layers=2,
    pack_pages=8,
    copy_bytes=8 << 20,
    warmup=1,
    repeats=3,
    probe_mnk=(64, 64, 128),
)


# --quick on the CPU interpreter (which costs milliseconds per program step): just enough to run
# every code path once, for the CPU tests and a smoke run without a GPU.
CPU_SMOKE = _Sizes(
    decode_batch=2,
    decode_context=64,
    split_context=256,
    prefill_seqs=1,
    prefill_tokens=32,
    pack_layers=2,
    pack_pages=4,
    copy_bytes=1 << 20,
    warmup=0,
    repeats=1,
    probe_mnk=(32, 32, 64),
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Back-to-back calls captured in one CUDA graph when timing a kernel's GPU time: enough that
# the replay's own launch is noise, few enough to keep the graph's memory pool small.
GRAPH_CALLS = 8


def _capture(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` back-to-back calls of ``fn`` (warmed up on a side stream first,
    as torch.cuda.graph requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    graphed: Sequence[bool] | None = None,
) -> list[Timing]:
    """Time each function, alternating one sample of each per round, after ``warmup`` rounds.

    CUDA: events around each call; for a function marked in ``graphed``, events around the
    replay of a CUDA graph of GRAPH_CALLS calls, divided by GRAPH_CALLS: the GPU time alone,
    without the Python launcher's host cost (which a graphed decode step never pays, and which
    exceeds the kernel's own time for a small split-KV decode). Baselines that a graph would
    turn into something else (a device copy becomes a DMA memcpy node) stay eager.
    Elsewhere: wall-clock around a synchronised call.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    _synchronize(device)
    use_graph = list(graphed or [False] * len(fns))
    graphs: list[torch.cuda.CUDAGraph | None] = [
        _capture(fn, GRAPH_CALLS) if device.type == "cuda" and g else None
        for fn, g in zip(fns, use_graph, strict=True)
    ]
    _synchronize(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                graph = graphs[index]
                start.record()
                if graph is not None:
                    graph.replay()
                else:
                    fn()
                end.record()
                end.synchronize()
                calls = GRAPH_CALLS if graph is not None else 1
                samples[index].append(start.elapsed_time(end) / 1e3 / calls)
            else:
                began = time.perf_counter()
                fn()
                samples[index].append(time.perf_counter() - began)
    return [Timing.of(s) for s in samples]


def host_launch_us(fn: Callable[[], object], *, device: torch.device, calls: int = 20) -> float:
    """Median host microseconds one call of ``fn`` takes to return (launch cost, no sync)."""
    _synchronize(device)
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1e6)
        _synchronize(device)
    return statistics.median(samples)


def _config_label(config: AttentionConfig) -> str:
    return (
        f"M{config.block_m} Q{config.block_q} T{config.tile} S{config.num_segments} "
        f"w{config.num_warps} s{config.num_stages}"
    )


def _sweep(
    run: Callable[[AttentionConfig], object],
    configs: Sequence[AttentionConfig],
    *,
    device: torch.device,
    sizes: _Sizes,
) -> dict[str, Any]:
    """Median microseconds of each alternative launch configuration, for tuning the heuristic.

    A configuration that fails to compile or launch (shared memory, registers) is recorded with
    its error instead of a time.
    """
    times: dict[str, float | str] = {}
    for config in configs:
        label = _config_label(config)
        try:
            (timing,) = time_interleaved(
                [lambda config=config: run(config)],
                device=device,
                warmup=sizes.warmup,
                repeats=sizes.repeats,
                graphed=[True],
            )
        except Exception as exc:  # any compile or launch failure is a result of the sweep
            logger.warning("config %s failed: %s", label, exc)
            times[label] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            continue
        times[label] = timing.median_s * 1e6
    measured = {k: v for k, v in times.items() if isinstance(v, float)}
    best = min(measured, key=lambda k: measured[k]) if measured else None
    return {"sweep_us": times, "sweep_best": best}


def _heuristic_label(
    *, device: torch.device, num_seqs: int, max_query_len: int, max_seq_len: int
) -> str:
    """The configuration the launcher's heuristic picks here, as the sweep labels it."""
    num_sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 1
    )
    config = attention_config(
        num_q_heads=NUM_Q_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_size=HEAD_SIZE,
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        num_sms=num_sms,
    )
    return _config_label(config)


def _gbps(num_bytes: float, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def _paged_decode_inputs(
    seq_lens: Sequence[int], *, device: torch.device, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """One query token per sequence; each context on shuffled pages of a bf16 cache."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    pages = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(pages)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache = torch.randn(shape, device=device, dtype=dtype)
    value_cache = torch.randn(shape, device=device, dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(pages):
        block_table[seq, :count] = order[used : used + count]
        used += count
    num_tokens = len(seq_lens)
    return {
        "query": torch.randn(num_tokens, NUM_Q_HEADS, HEAD_SIZE, device=device, dtype=dtype),
        "key_cache": key_cache,
        "value_cache": value_cache,
        "block_table": block_table.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "query_start": torch.arange(num_tokens + 1, dtype=torch.int32, device=device),
    }


def _decode_case(
    name: str,
    *,
    batch: int,
    context: int,
    target: float,
    sizes: _Sizes,
    device: torch.device,
    num_segments: int | None,
    sweep: Sequence[AttentionConfig] = (),
) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    inputs = _paged_decode_inputs([context] * batch, device=device, gen=gen)
    query, key_cache, value_cache = inputs["query"], inputs["key_cache"], inputs["value_cache"]
    out = torch.empty_like(query)
    elem = query.element_size()
    num_bytes = (
        2 * batch * context * NUM_KV_HEADS * HEAD_SIZE * elem  # K and V, read once
        + 2 * query.numel() * elem  # Q in, O out
        + inputs["block_table"].numel() * 4
    )

    def ours(segments: int | None = num_segments, config: AttentionConfig | None = None) -> object:
        return paged_attention(
            query,
            key_cache,
            value_cache,
            block_table=inputs["block_table"],
            seq_lens=inputs["seq_lens"],
            query_start=inputs["query_start"],
            max_query_len=1,
            max_seq_len=context,
            num_segments=segments,
            config=config,
            out=out,
        )

    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fns: list[Callable[[], object]] = [ours, lambda: dst.copy_(src)]
    if batch == 1:
        fns.append(lambda: ours(1))  # the 2D path on the same inputs, for the record
    timings = time_interleaved(
        fns,
        device=device,
        warmup=sizes.warmup,
        repeats=sizes.repeats,
        graphed=[True, False, True][: len(fns)],
    )
    t_ours, t_copy = timings[0], timings[1]
    copy_gbps = _gbps(2 * sizes.copy_bytes, t_copy.median_s)
    achieved = _gbps(num_bytes, t_ours.median_s)
    at_copy_speed_us = num_bytes / (copy_gbps * 1e9) * 1e6
    params: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "num_q_heads": NUM_Q_HEADS,
        "num_kv_heads": NUM_KV_HEADS,
        "head_size": HEAD_SIZE,
        "block_size": BLOCK_SIZE,
        "dtype": str(query.dtype).removeprefix("torch."),
        "bytes": num_bytes,
        "achieved_GBps": achieved,
        "copy_GBps": copy_gbps,
        "p20_us": t_ours.p20_s * 1e6,
        "p80_us": t_ours.p80_s * 1e6,
        "timing": "GPU time per call: CUDA graph replays; copy baseline eager",
        "host_launch_us": host_launch_us(ours, device=device),
        "config": (
            _heuristic_label(device=device, num_seqs=batch, max_query_len=1, max_seq_len=context)
            if num_segments is None
            else f"heuristic with num_segments={num_segments}"
        ),
    }
    if len(timings) > 2:
        params["no_split_us"] = timings[2].median_s * 1e6
    if sweep:
        params.update(_sweep(lambda config: ours(None, config), sweep, device=device, sizes=sizes))
    return BenchResult(
        name=name,
        metric="time",
        unit="us",
        value=t_ours.median_s * 1e6,
        baseline_name="device copy of the same bytes at the measured copy bandwidth",
        baseline_value=at_copy_speed_us,
        ratio=at_copy_speed_us / (t_ours.median_s * 1e6),
        higher_is_better=False,
        target=target,
        params=params,
    )


@contextlib.contextmanager
def _flash_only(device: torch.device) -> Generator[str]:
    """Force SDPA's flash backend on CUDA; say which backend runs."""
    if device.type != "cuda":
        yield "default (cpu)"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415 (CUDA only)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        yield "flash"


def _prefill_case(
    *, sizes: _Sizes, device: torch.device, sweep: Sequence[AttentionConfig] = ()
) -> BenchResult:
    seqs, tokens = sizes.prefill_seqs, sizes.prefill_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(1)
    # Contiguous [batch, heads, tokens, head] for SDPA, K/V repeated per query head.
    q = torch.randn(seqs, NUM_Q_HEADS, tokens, HEAD_SIZE, generator=gen).to(device, dtype)
    k = torch.randn(seqs, NUM_KV_HEADS, tokens, HEAD_SIZE, generator=gen).to(device, dtype)
    v = torch.randn(seqs, NUM_KV_HEADS, tokens, HEAD_SIZE, generator=gen).to(device, dtype)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    k_full = k.repeat_interleave(group, dim=1).contiguous()
    v_full = v.repeat_interleave(group, dim=1).contiguous()

    # The same keys in pages: [num_blocks, block_size, kv_heads, head], shuffled block table.
    pages = tokens // BLOCK_SIZE
    order = torch.randperm(seqs * pages, generator=gen)
    block_table = order.view(seqs, pages).to(torch.int32)
    key_cache = torch.empty(seqs * pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=dtype)
    value_cache = torch.empty_like(key_cache)
    # [seqs, kv_heads, tokens, head] -> [seqs, pages, block, kv_heads, head]
    paged_k = k.cpu().permute(0, 2, 1, 3).reshape(seqs, pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    paged_v = v.cpu().permute(0, 2, 1, 3).reshape(seqs, pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache[block_table.long()] = paged_k
    value_cache[block_table.long()] = paged_v
    query = q.permute(0, 2, 1, 3).reshape(seqs * tokens, NUM_Q_HEADS, HEAD_SIZE).contiguous()
    args: dict[str, Any] = {
        "block_table": block_table.to(device),
        "seq_lens": torch.full((seqs,), tokens, dtype=torch.int32, device=device),
        "query_start": torch.arange(0, seqs * tokens + 1, tokens, dtype=torch.int32, device=device),
        "max_query_len": tokens,
        "max_seq_len": tokens,
    }
    key_cache, value_cache = key_cache.to(device), value_cache.to(device)
    out = torch.empty_like(query)

    def ours() -> object:
        return paged_attention(query, key_cache, value_cache, out=out, **args)

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    backend = "flash"
    try:
        with _flash_only(device) as backend:
            t_ours, t_sdpa = time_interleaved(
                [ours, sdpa],
                device=device,
                warmup=sizes.warmup,
                repeats=sizes.repeats,
                graphed=[True, True],
            )
            expected = sdpa()
    except RuntimeError as exc:  # no flash kernel for this build or card: say so, use default
        logger.warning("SDPA flash backend unavailable (%s); timing the default backend", exc)
        backend = "default (flash unavailable)"
        t_ours, t_sdpa = time_interleaved(
            [ours, sdpa],
            device=device,
            warmup=sizes.warmup,
            repeats=sizes.repeats,
            graphed=[True, True],
        )
        expected = sdpa()
    expected = expected.permute(0, 2, 1, 3).reshape_as(out)
    ours()
    diff = float((out.float() - expected.float()).abs().max().item())
    swept: dict[str, Any] = {}
    if sweep:

        def with_config(config: AttentionConfig) -> object:
            return paged_attention(query, key_cache, value_cache, out=out, config=config, **args)

        swept = _sweep(with_config, sweep, device=device, sizes=sizes)
    flops = 4 * seqs * NUM_Q_HEADS * tokens * tokens * HEAD_SIZE / 2  # causal: half the scores
    return BenchResult(
        name=f"prefill {seqs}x{tokens}",
        metric="time",
        unit="ms",
        value=t_ours.median_s * 1e3,
        baseline_name=f"torch scaled_dot_product_attention ({backend}), contiguous keys",
        baseline_value=t_sdpa.median_s * 1e3,
        ratio=t_sdpa.median_s / t_ours.median_s,
        higher_is_better=False,
        target=0.8,
        params={
            "seqs": seqs,
            "tokens": tokens,
            "num_q_heads": NUM_Q_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": str(dtype).removeprefix("torch."),
            "tflops": flops / t_ours.median_s / 1e12,
            "baseline_tflops": flops / t_sdpa.median_s / 1e12,
            "p20_ms": t_ours.p20_s * 1e3,
            "p80_ms": t_ours.p80_s * 1e3,
            "max_abs_diff_vs_sdpa": diff,
            "config": _heuristic_label(
                device=device, num_seqs=seqs, max_query_len=tokens, max_seq_len=tokens
            ),
            **swept,
        },
    )


def _pack_cases(*, sizes: _Sizes, device: torch.device) -> list[BenchResult]:
    layers, num_pages = sizes.pack_layers, sizes.pack_pages
    dtype = torch.bfloat16
    page = (2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)  # K and V of one page: 64 KiB in bf16
    gen = torch.Generator().manual_seed(2)
    num_blocks = 2 * num_pages
    kv_cache = torch.empty((layers, num_blocks, *page), dtype=dtype, device=device)
    kv_cache.view(torch.int16).random_(generator=None)
    block_ids = torch.randperm(num_blocks, generator=gen)[:num_pages].to(device)
    buffer = torch.empty((layers, num_pages, *page), dtype=dtype, device=device)
    num_bytes = buffer.numel() * buffer.element_size()
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    t_pack, t_unpack, t_copy = time_interleaved(
        [
            lambda: pack_pages(kv_cache, block_ids, out=buffer),
            lambda: unpack_pages(buffer, kv_cache, block_ids),
            lambda: dst.copy_(src),
        ],
        device=device,
        warmup=sizes.warmup,
        repeats=sizes.repeats,
        graphed=[True, True, False],
    )
    exact = torch.equal(buffer.view(torch.int16), kv_cache[:, block_ids].view(torch.int16))
    copy_gbps = _gbps(2 * sizes.copy_bytes, t_copy.median_s)
    results = []
    for label, timing in (("pack", t_pack), ("unpack", t_unpack)):
        gbps = _gbps(2 * num_bytes, timing.median_s)  # each byte read once and written once
        results.append(
            BenchResult(
                name=f"{label} {num_bytes / 2**20:g} MiB",
                metric="throughput",
                unit="GB/s",
                value=gbps,
                baseline_name=f"device copy {sizes.copy_bytes / 2**20:g} MiB",
                baseline_value=copy_gbps,
                ratio=gbps / copy_gbps,
                higher_is_better=True,
                target=0.8,
                params={
                    "layers": layers,
                    "pages": num_pages,
                    "page_bytes": math.prod(page) * 2,
                    "bytes": num_bytes,
                    "time_us": timing.median_s * 1e6,
                    "p20_us": timing.p20_s * 1e6,
                    "p80_us": timing.p80_s * 1e6,
                    "round_trip_bit_exact": exact,
                },
            )
        )
    return results


def probe_bench_results(results: Sequence[ProbeResult]) -> list[BenchResult]:
    """One schema row per probe configuration: the effective mantissa bits, against the 23 of
    a full fp32 accumulator (the ratio says how much of fp32's precision survives)."""
    return [
        BenchResult(
            name=f"probe {r.config.label}",
            metric="accumulator_mantissa_bits",
            unit="bits",
            value=r.mantissa_bits,
            baseline_name="full fp32 accumulator (e8m23)",
            baseline_value=float(FP32_MANTISSA_BITS),
            ratio=r.mantissa_bits / FP32_MANTISSA_BITS,
            higher_is_better=True,
            target=None,
            params=r.to_json(),
        )
        for r in results
    ]


def run_probe_sweep(
    configs: Sequence[ProbeConfig],
    *,
    mnk: tuple[int, int, int],
    device: torch.device,
) -> list[ProbeResult]:
    """Run every configuration of the probe, logging progress."""
    results = []
    m, n, k = mnk
    for index, config in enumerate(configs, 1):
        logger.info("probe %d/%d: %s", index, len(configs), config.label)
        results.append(run_probe(config, m=m, n=n, k=k, device=device))
    return results


def _decode_sweep() -> list[AttentionConfig]:
    """Alternatives to the heuristic for batch-64 decode: key tile, pipeline depth, warps."""
    configs = [
        AttentionConfig(16, 4, tile, 1, 4, stages) for tile in (32, 64, 128) for stages in (2, 3, 4)
    ]
    return [*configs, AttentionConfig(16, 4, 64, 1, 8, 3), AttentionConfig(16, 4, 128, 1, 8, 3)]


def _split_sweep() -> list[AttentionConfig]:
    """Alternatives for batch-1 long decode: segment count and key tile."""
    return [
        AttentionConfig(16, 4, tile, segments, 4, 3)
        for segments in (8, 16, 32, 64)
        for tile in (32, 64, 128)
    ]


def _prefill_sweep() -> list[AttentionConfig]:
    """Alternatives for long prefill: Q rows, key tile, warps and stages."""
    group = NUM_Q_HEADS // NUM_KV_HEADS
    return [
        AttentionConfig(block_m, block_m // group, tile, 1, warps, stages)
        for block_m in (64, 128)
        for tile in (32, 64, 128)
        for warps, stages in ((4, 2), (8, 2), (8, 3))
    ]


def bench_device() -> torch.device:
    """The CUDA device, or the CPU when the Triton interpreter is on; else DeviceUnavailable."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if triton_interpreter_enabled():
        return torch.device("cpu")
    raise DeviceUnavailable("kvstack-kernels bench")


def run_bench(
    *, quick: bool, cases: Sequence[str] = CASES, device: torch.device | None = None
) -> list[BenchResult]:
    """Run the chosen cases; full sizes need CUDA (the interpreter would take hours)."""
    device = device or bench_device()
    if device.type != "cuda" and not quick:
        raise DeviceUnavailable("a full-size kvstack-kernels bench (use --quick on the CPU)")
    sizes = FULL if not quick else QUICK if device.type == "cuda" else CPU_SMOKE
    results: list[BenchResult] = []
    if "decode" in cases:
        logger.info("decode %dx%d", sizes.decode_batch, sizes.decode_context)
        results.append(
            _decode_case(
                f"decode b{sizes.decode_batch}x{sizes.decode_context}",
                batch=sizes.decode_batch,
                context=sizes.decode_context,
                target=0.85,
                sizes=sizes,
                device=device,
                num_segments=None,
                # --quick keeps one alternative, so the sweep's code path still runs.
                sweep=_decode_sweep()[:1] if quick else _decode_sweep(),
            )
        )
    if "split" in cases:
        logger.info("decode 1x%d (split-KV)", sizes.split_context)
        results.append(
            _decode_case(
                f"decode b1x{sizes.split_context} split-KV",
                batch=1,
                context=sizes.split_context,
                target=0.7,
                sizes=sizes,
                device=device,
                # The interpreter's nominal single SM never splits: force the path there.
                num_segments=None if device.type == "cuda" else 4,
                sweep=() if quick else _split_sweep(),
            )
        )
    if "prefill" in cases:
        logger.info("prefill %dx%d", sizes.prefill_seqs, sizes.prefill_tokens)
        results.append(
            _prefill_case(sizes=sizes, device=device, sweep=() if quick else _prefill_sweep())
        )
    if "pack" in cases:
        logger.info("pack/unpack %d layers x %d pages", sizes.pack_layers, sizes.pack_pages)
        results.extend(_pack_cases(sizes=sizes, device=device))
    if "probe" in cases:
        if quick:
            configs = probe_configs(block_ks=(32,), warps=(4,), upcast_fp8=False)
        else:
            # Issue 5's table, plus fp8 with max_num_imprecise_acc=32 (promote to fp32 every 32
            # K), which should move the plateau (kernels.md, "Gotchas").
            configs = probe_configs(max_num_imprecise_accs=(0, 32))
        probes = run_probe_sweep(configs, mnk=sizes.probe_mnk, device=device)
        results.extend(probe_bench_results(probes))
    return results


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bench_document(results: Sequence[BenchResult], *, device: torch.device) -> dict[str, Any]:
    """The ``kvstack-bench/1`` document for ``results``; ``machine.gpu`` names the card."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "schema": SCHEMA,
        "suite": SUITE,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu},
        "versions": versions,
        "results": [r.to_json() for r in results],
    }


def format_results(results: Sequence[BenchResult], *, card: str) -> str:
    """A table of every result, marking each that misses its target."""
    lines = [f"kvstack-kernels bench on {card}"]
    header = f"{'case':<40} {'value':>12} {'unit':<6} {'baseline':>12} {'ratio':>7} {'target':>7}"
    lines += [header, "-" * len(header)]
    for r in results:
        baseline = f"{r.baseline_value:12.4g}"
        ratio = f"{r.ratio:7.3f}"
        target = f"{r.target:7.2f}" if r.target is not None else " " * 7
        miss = "  MISS" if r.target is not None and r.ratio < r.target else ""
        lines.append(f"{r.name:<40} {r.value:12.4g} {r.unit:<6} {baseline} {ratio} {target}{miss}")
    lines.append("ratio: higher is better (baseline/ours for times, ours/baseline for throughput)")
    for r in results:
        best = r.params.get("sweep_best")
        if best is not None:
            lines.append(
                f"  {r.name}: heuristic {r.value:.4g} {r.unit}; fastest alternative {best}: "
                f"{r.params['sweep_us'][best]:.4g} us"
            )
    return "\n".join(lines)
