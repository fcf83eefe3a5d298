"""SmolLM2 on this machine: decode tokens/s at batch 1 vs 8, and TTFT of a ~1K-token prompt cold
vs with its prefix cached. Writes kvstack-bench/1 JSON (``--json PATH``) and prints a table.

Decode runs the engine in-process (no HTTP), timing decode-only steps; TTFT goes through a real
server process and the client clock, first byte of streamed text. Both pairs are interleaved
after a warm-up, on the same inputs.

    python packages/serve/benchmarks/bench_serve.py --json bench-serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvstack.serve import (
    EngineConfig,
    LLMEngine,
    LoadedModel,
    SamplingParams,
    ServerProcess,
    load_model,
)
from kvstack.serve._bench import (
    bench_document,
    fetch_model_card,
    prefix_ttft_probe,
    prefix_ttft_result,
    result_entry,
)
from kvstack.serve._env import torch_threads


def decode_tokens_per_s(engine: LLMEngine, prompts: list[list[int]], *, decode_steps: int) -> float:
    """Aggregate decode tokens/s of one batch: prefill first, then time ``decode_steps`` steps."""
    params = SamplingParams(max_tokens=decode_steps + 2, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"d{index}-{time.monotonic_ns()}", prompt, params)
    started_decoding: set[str] = set()
    while len(started_decoding) < len(prompts):  # prefills (and first tokens) are not timed
        started_decoding.update(out.request_id for out in engine.step())
    started = time.perf_counter()
    tokens = 0
    for _ in range(decode_steps):
        engine.step()
        last = engine.last_step
        tokens += last.num_tokens if last is not None else 0
    elapsed = time.perf_counter() - started
    while engine.has_unfinished():
        engine.step()
    return tokens / elapsed


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write kvstack-bench/1 JSON here")
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved repeats per pair (default: 5)"
    )
    parser.add_argument(
        "--decode-steps", type=int, default=32, help="timed decode steps per run (default: 32)"
    )
    parser.add_argument(
        "--prompt-len", type=int, default=1024, help="TTFT prompt tokens (default: 1024)"
    )
    args = parser.parse_args()
    threads = torch_threads()
    torch.set_num_threads(threads)
    loaded: LoadedModel = load_model("smollm2")
    rng = np.random.default_rng(0)

    # ---- decode tokens/s, batch 1 vs batch 8 --------------------------------------------
    engine = LLMEngine(loaded, EngineConfig(num_blocks=256))
    prompts = [rng.integers(1000, 30000, 32).tolist() for _ in range(8)]
    decode_tokens_per_s(engine, prompts[:2], decode_steps=4)  # warm-up
    runs: dict[int, list[float]] = {1: [], 8: []}
    for repeat in range(args.repeats):
        for batch in (1, 8):
            runs[batch].append(
                decode_tokens_per_s(engine, prompts[:batch], decode_steps=args.decode_steps)
            )
            print(
                f"decode repeat {repeat} batch {batch}: {runs[batch][-1]:.1f} tok/s",
                file=sys.stderr,
            )
    del engine

    # ---- TTFT of a 1K-token prompt, cold vs prefix cached -------------------------------
    up = ["--model", "smollm2", "--port", "0", "--kv-cache-size", "256MiB"]
    with ServerProcess.start(up) as server:
        model = fetch_model_card(server.url)["id"]
        probe = functools.partial(
            prefix_ttft_probe, server.url, model, vocab_size=loaded.model.config.vocab_size
        )
        asyncio.run(probe(prompt_len=64, repeats=1, seed=1))  # warm-up
        cold, warm = asyncio.run(probe(prompt_len=args.prompt_len, repeats=args.repeats, seed=0))
    for repeat, (c, w) in enumerate(zip(cold, warm, strict=True)):
        print(
            f"ttft repeat {repeat}: cold {c * 1e3:.0f} ms, cached {w * 1e3:.0f} ms", file=sys.stderr
        )

    b1, b8 = statistics.median(runs[1]), statistics.median(runs[8])
    common = {
        "model": loaded.name,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": threads,
        "repeats": args.repeats,
    }
    results = [
        result_entry(
            "smollm2 decode batch 8 vs batch 1",
            metric="throughput",
            unit="tok/s",
            value=b8,
            baseline_name="smollm2 decode batch 1",
            baseline_value=b1,
            higher_is_better=True,
            params={
                **common,
                "decode_steps": args.decode_steps,
                "prompt_len": 32,
                "batch1_p20_p80": [pct(runs[1], 20), pct(runs[1], 80)],
                "batch8_p20_p80": [pct(runs[8], 20), pct(runs[8], 80)],
            },
        ),
        prefix_ttft_result(cold, warm, prompt_len=args.prompt_len, model=loaded.name),
    ]
    print(f"{'case':<52} {'ours':>10} {'baseline':>10} {'ratio':>7}")
    for r in results:
        print(
            f"{r['name']:<52} {r['value']:>10.1f} {r['baseline']['value']:>10.1f} "
            f"{r['ratio']:>7.2f}  {r['unit']}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(bench_document(results), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
