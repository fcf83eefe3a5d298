"""Disaggregation and global prefix reuse (issue 7), side by side in one run; kvstack-bench/1.

1. Cross-instance reuse: a long-prefix prompt is served by instance A (which writes its full KV
   blocks to the store), then by instance B that reads them from the store, and by instance C
   without the store. TTFT of B vs C, median over several prompts (each new to B and C).
2. PD vs colocated: 1 prefill + 1 decode worker vs 2 colocated workers (each behind a router),
   the same mix of long prompts arriving while short-prompt requests decode. Inter-token latency
   p99 of the decoding requests (PD keeps prefills off the decoder), and per handed-off request
   the KV push time and GB/s.

    python packages/serve/benchmarks/bench_pd.py --json bench-pd.json           # SmolLM2, CPU
    python packages/serve/benchmarks/bench_pd.py --quick --json bench-pd.json   # tiny model
    python packages/serve/benchmarks/bench_pd.py --device cuda --skip reuse     # GPU (Triton)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import torch

from kvstack.serve import ServerProcess
from kvstack.serve._bench import (
    BenchPrompt,
    LoadConfig,
    RequestRecord,
    bench_document,
    fetch_model_card,
    result_entry,
    run_load,
)
from kvstack.store import MasterConfig, NodeConfig, StoreNode, run_master_in_thread


def _ids(count: int, length: int, *, vocab: int, seed: int) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    low, high = (32, 127) if vocab <= 512 else (1000, min(vocab, 30000))
    return [gen.integers(low, high, length).tolist() for _ in range(count)]


async def _ttft_ms(base_url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    """TTFT of one streamed request, and the prompt tokens it read from the store."""
    config = LoadConfig(base_url=base_url, model=model, max_concurrency=1)
    [record], _ = await run_load(config, [BenchPrompt(prompt, 2)])
    if not record.ok:
        raise SystemExit(f"request to {base_url} failed: {record.error}")
    return record.ttft_s * 1e3, record.store_cached_tokens


def _wait_saved(url: str, written_blocks: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx2.get(f"{url}/metrics", timeout=10).text
        written = sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("kvstack_serve_store_blocks_total") and 'direction="written"' in line
        )
        if written >= written_blocks:
            return
        time.sleep(0.05)
    raise SystemExit(f"{url} did not write its blocks to the store within {timeout_s} s")


def reuse_case(args: argparse.Namespace, stack: ExitStack) -> list[dict[str, Any]]:
    master, stop = run_master_in_thread(MasterConfig(port=0))
    stack.callback(stop)
    node = StoreNode(NodeConfig(master=master.address, memory_bytes=args.store_bytes))
    node.start()
    stack.callback(node.close)
    base = ["--model", args.model, "--port", "0", "--device", args.device]
    with_store = [*base, "--store", master.address]
    a = stack.enter_context(ServerProcess.start(with_store))
    b = stack.enter_context(ServerProcess.start(with_store))
    c = stack.enter_context(ServerProcess.start(base))
    card = fetch_model_card(a.url)
    model = card["id"]
    prompts = _ids(args.reuse_prompts, args.reuse_len, vocab=int(card["vocab_size"]), seed=1)
    warm = _ids(1, 64, vocab=int(card["vocab_size"]), seed=2)[0]
    for url in (b.url, c.url):
        asyncio.run(_ttft_ms(url, model, warm))  # first-request costs out of the way
    with_ms, without_ms, read = [], [], []
    for index, prompt in enumerate(prompts):
        asyncio.run(_ttft_ms(a.url, model, prompt))
        # The write-back is asynchronous: wait until A wrote this prompt's full blocks.
        _wait_saved(a.url, written_blocks=(index + 1) * (len(prompt) // 16))
        ms, from_store = asyncio.run(_ttft_ms(b.url, model, prompt))
        with_ms.append(ms)
        read.append(from_store)
        without_ms.append(asyncio.run(_ttft_ms(c.url, model, prompt))[0])
        print(
            f"reuse: B with store {ms:.1f} ms ({from_store} tokens read), "
            f"C without {without_ms[-1]:.1f} ms",
            file=sys.stderr,
        )
    value, baseline = statistics.median(with_ms), statistics.median(without_ms)
    params = {
        "model": args.model,
        "device": args.device,
        "prompt_tokens": args.reuse_len,
        "prompts": args.reuse_prompts,
        "store_tokens_read_per_prompt": read,
        "ttft_ms_with_store": with_ms,
        "ttft_ms_without_store": without_ms,
    }
    return [
        result_entry(
            f"cross-instance reuse: TTFT p50 of a {args.reuse_len}-token prompt, B with store",
            metric="latency_p50",
            unit="ms",
            value=value,
            baseline_name="the same prompt on B without the store",
            baseline_value=baseline,
            higher_is_better=False,
            params=params,
            target=3.0,
        )
    ]


def _mixed_workload(args: argparse.Namespace, vocab: int) -> list[BenchPrompt]:
    """Short prompts that decode long, with long prompts in between (one every few)."""
    short = _ids(args.decoders, 32, vocab=vocab, seed=3)
    long = _ids(args.long_prompts, args.long_len, vocab=vocab, seed=4)
    items = [BenchPrompt(p, args.decode_len) for p in short]
    for index, prompt in enumerate(long):
        items.insert(min(len(items), 2 + index * 2), BenchPrompt(prompt, 4))
    return items


def _itl_p99_ms(records: list[RequestRecord], output_len: int) -> float:
    gaps = [g for r in records if r.completion_tokens >= output_len for g in r.itl_s]
    return float(np.percentile(np.asarray(gaps) * 1e3, 99))


def _copy_rate_gb_s(nbytes: int, device: str) -> float:
    """The baseline of a push: the best of 20 plain copies of ``nbytes`` on ``device``."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(20):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def pd_case(args: argparse.Namespace, stack: ExitStack) -> list[dict[str, Any]]:
    base = ["--model", args.model, "--port", "0", "--device", args.device, "--no-store"]
    runs: dict[str, tuple[list[RequestRecord], float]] = {}
    for label, extra in (
        ("colocated", ["--workers", "2", "--policy", "round_robin"]),
        ("pd", ["--prefill", "1", "--decode", "1"]),
    ):
        with ServerProcess.start([*base, *extra], ready_timeout_s=300) as cluster:
            card = fetch_model_card(cluster.url)
            items = _mixed_workload(args, int(card["vocab_size"]))
            config = LoadConfig(
                base_url=cluster.url,
                model=card["id"],
                request_rate=args.rate,
                max_concurrency=args.decoders + args.long_prompts,
            )
            # Warm-up, unmeasured: one short and one long prompt (first kernel launches).
            warm = [items[0], next(i for i in items if i.output_len == 4)]
            for item in warm:
                asyncio.run(run_load(config, [item]))
            records, duration = asyncio.run(run_load(config, items))
            failed = [r.error for r in records if not r.ok]
            if failed:
                raise SystemExit(f"{label}: {len(failed)} requests failed: {failed[:3]}")
            runs[label] = (records, duration)
            print(
                f"{label}: ITL p99 {_itl_p99_ms(records, args.decode_len):.1f} ms", file=sys.stderr
            )
    pd_records = runs["pd"][0]
    pushes = [r for r in pd_records if r.kv_transfer_bytes]
    seconds = [r.kv_transfer_s for r in pushes]
    per_request = [
        {
            "prompt_tokens": r.prompt_tokens,
            "kv_bytes": r.kv_transfer_bytes,
            "kv_transfer_ms": r.kv_transfer_s * 1e3,
            "gb_per_s": r.kv_transfer_bytes / r.kv_transfer_s / 1e9 if r.kv_transfer_s else None,
        }
        for r in pushes
    ]
    params = {
        "model": args.model,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "decoding_requests": args.decoders,
        "decode_len": args.decode_len,
        "long_prompts": args.long_prompts,
        "long_prompt_tokens": args.long_len,
        "kv_transfer_ms_p50": statistics.median(seconds) * 1e3 if seconds else None,
        "per_request": per_request,
    }
    itl = {k: _itl_p99_ms(v[0], args.decode_len) for k, v in runs.items()}
    results = [
        result_entry(
            "ITL p99 of decoding requests while long prompts arrive, 1 prefill + 1 decode",
            metric="latency_p99",
            unit="ms",
            value=itl["pd"],
            baseline_name="2 colocated workers (round robin)",
            baseline_value=itl["colocated"],
            higher_is_better=False,
            params=params,
            target=1.0,
        )
    ]
    long_pushes = [r for r in pushes if r.prompt_tokens >= args.long_len and r.kv_transfer_s]
    if long_pushes:
        nbytes = long_pushes[0].kv_transfer_bytes
        rate = statistics.median(r.kv_transfer_bytes / r.kv_transfer_s / 1e9 for r in long_pushes)
        copy = _copy_rate_gb_s(nbytes, args.device)
        results.append(
            result_entry(
                f"KV push prefill -> decode of a {args.long_len}-token prompt, p50",
                metric="throughput",
                unit="GB/s",
                value=rate,
                baseline_name=f"one in-process copy of the same {nbytes} bytes on {args.device}",
                baseline_value=copy,
                higher_is_better=True,
                params={"kv_bytes": nbytes, "per_request": per_request},
            )
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write kvstack-bench/1 JSON here")
    parser.add_argument("--quick", action="store_true", help="the tiny model, small sizes")
    parser.add_argument("--model", default=None, help="smollm2 or tiny (default: smollm2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--skip", choices=["reuse", "pd"], default=None, help="leave one out")
    parser.add_argument("--reuse-len", type=int, default=None, help="reuse prompt tokens")
    parser.add_argument("--reuse-prompts", type=int, default=3, help="reuse prompts (default 3)")
    parser.add_argument("--store-bytes", type=int, default=1 << 30, help="store node memory")
    parser.add_argument("--decoders", type=int, default=None, help="decoding requests")
    parser.add_argument("--decode-len", type=int, default=None, help="their output tokens")
    parser.add_argument("--long-prompts", type=int, default=None, help="long prompts")
    parser.add_argument("--long-len", type=int, default=None, help="long prompt tokens")
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    args = parser.parse_args()
    quick = args.quick
    args.model = args.model or ("tiny" if quick else "smollm2")
    args.reuse_len = args.reuse_len or (512 if quick else 1536)
    args.decoders = args.decoders or (4 if quick else 6)
    args.decode_len = args.decode_len or (16 if quick else 48)
    args.long_prompts = args.long_prompts or (2 if quick else 4)
    args.long_len = args.long_len or (256 if quick else 1024)
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        if args.skip != "reuse":
            results += reuse_case(args, stack)
    if args.skip != "pd":
        with ExitStack() as stack:
            results += pd_case(args, stack)
    for r in results:
        print(
            f"{r['name']}: {r['value']:.3f} {r['unit']} vs {r['baseline']['value']:.3f} "
            f"(ratio {r['ratio']:.2f}, target {r['target']})"
        )
    if args.json is not None:
        gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
        document = bench_document(results, suite="serve-pd", gpu=gpu)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
