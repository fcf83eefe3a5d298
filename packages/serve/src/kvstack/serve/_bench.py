"""``kvstack-serve bench``: load an OpenAI-compatible server and measure it (``vllm bench serve``).

Definitions (client clock, streaming): TTFT = first non-empty text chunk - send; ITL = gaps
between successive text chunks; TPOT = (E2EL - TTFT) / (output tokens - 1); E2EL = last byte -
send; goodput = requests per second that meet every given SLO. Failed requests are counted,
never dropped. The baseline of every result is the same dataset run one request at a time
before the load, in the same process against the same server; its prompts are the dataset's
first ones, so the load run finds their prefixes cached (the hit-rate rows show it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

from kvstack.serve._disagg import TIMINGS_HEADER, HandoffTimings
from kvstack.serve.errors import BenchError

__all__ = [
    "BenchPrompt",
    "LoadConfig",
    "RequestRecord",
    "Summary",
    "bench_document",
    "counter_deltas",
    "fetch_model_card",
    "format_probe",
    "format_summaries",
    "load_results",
    "per_request_rows",
    "prefix_ttft_probe",
    "prefix_ttft_result",
    "progress_printer",
    "random_dataset",
    "result_entry",
    "run_load",
    "scrape_counters",
    "shared_prefix_dataset",
    "sharegpt_dataset",
    "summarize",
    "token_range",
]

SCHEMA_ID = "kvstack-bench/1"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class BenchPrompt:
    """One request to send: text or token ids, and how many tokens to generate."""

    prompt: str | list[int]
    output_len: int


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one request measured (seconds, client clock); ``error`` is None on success."""

    ok: bool
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    itl_s: tuple[float, ...]
    e2e_s: float
    # PD mode: the prefill -> decode KV push of this request (from x-kvstack-timings).
    kv_transfer_s: float = 0.0
    kv_transfer_bytes: int = 0
    store_cached_tokens: int = 0  # of cached_tokens, read from the store


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """How to send: ``request_rate`` per second (``inf``: all at once), optional concurrency cap."""

    base_url: str
    model: str
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise BenchError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchError(f"max_concurrency must be at least 1, got {self.max_concurrency}")


# ---- datasets ----------------------------------------------------------------------------


def token_range(vocab_size: int) -> tuple[int, int]:
    # Skip the low ids (bytes or control tokens) of real vocabularies; byte vocabularies keep
    # printable bytes only.
    return (32, 127) if vocab_size <= 512 else (1000, min(vocab_size, 30000))


def random_dataset(
    num_prompts: int, *, input_len: int, output_len: int, vocab_size: int, seed: int
) -> list[BenchPrompt]:
    """Prompts of exactly ``input_len`` random token ids."""
    rng = np.random.default_rng(seed)
    lo, hi = token_range(vocab_size)
    return [
        BenchPrompt(rng.integers(lo, hi, input_len).tolist(), output_len)
        for _ in range(num_prompts)
    ]


def shared_prefix_dataset(
    *,
    num_groups: int,
    prompts_per_group: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    vocab_size: int,
    seed: int,
) -> list[BenchPrompt]:
    """Groups of prompts sharing a long random prefix, each with its own suffix; shuffled."""
    rng = np.random.default_rng(seed)
    lo, hi = token_range(vocab_size)
    prompts = []
    for _ in range(num_groups):
        prefix = rng.integers(lo, hi, prefix_len).tolist()
        for _ in range(prompts_per_group):
            suffix = rng.integers(lo, hi, suffix_len).tolist()
            prompts.append(BenchPrompt(prefix + suffix, output_len))
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


def sharegpt_dataset(
    path: Path, *, num_prompts: int, output_len: int | None, seed: int
) -> list[BenchPrompt]:
    """First human turn of each ShareGPT conversation; output length from the reply (chars/4)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read ShareGPT file {path}: {exc}") from exc
    if not isinstance(data, list):
        raise BenchError(f"ShareGPT file {path} must hold a JSON list, got {type(data).__name__}")
    prompts = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        human, reply = turns[0].get("value"), turns[1].get("value")
        if not isinstance(human, str) or not isinstance(reply, str) or not human:
            continue
        length = output_len if output_len is not None else max(4, min(len(reply) // 4, 256))
        prompts.append(BenchPrompt(human, length))
    if not prompts:
        raise BenchError(f"ShareGPT file {path} holds no usable conversation")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:num_prompts]]


# ---- sending -----------------------------------------------------------------------------


def fetch_model_card(base_url: str, *, timeout_s: float = 30.0) -> dict[str, Any]:
    """The first entry of ``GET /v1/models``."""
    try:
        response = httpx2.get(f"{base_url}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        return response.json()["data"][0]
    except (httpx2.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise BenchError(f"cannot list models at {base_url}: {exc}") from exc


async def _one(client: httpx2.AsyncClient, config: LoadConfig, item: BenchPrompt) -> RequestRecord:
    body = {
        "model": config.model,
        "prompt": item.prompt,
        "max_tokens": item.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    chunk_times: list[float] = []
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                raise BenchError(f"HTTP {response.status_code}: {detail}")
            timings = HandoffTimings.parse(response.headers.get(TIMINGS_HEADER, ""))
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    raise BenchError(f"server error mid-stream: {event['error'].get('message')}")
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    chunk_times.append(time.perf_counter())
        end = time.perf_counter()
    except (httpx2.HTTPError, BenchError, ValueError) as exc:
        return RequestRecord(False, f"{type(exc).__name__}: {exc}", 0, 0, 0, 0.0, (), 0.0)
    if not chunk_times:
        return RequestRecord(False, "no text received", 0, 0, 0, 0.0, (), end - sent)
    details = usage.get("prompt_tokens_details") or {}
    return RequestRecord(
        ok=True,
        error=None,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", len(chunk_times))),
        cached_tokens=int(details.get("cached_tokens", 0)),
        ttft_s=chunk_times[0] - sent,
        itl_s=tuple(b - a for a, b in itertools.pairwise(chunk_times)),
        e2e_s=end - sent,
        store_cached_tokens=int(details.get("store_cached_tokens", 0)),
        kv_transfer_s=timings.transfer_s if timings else 0.0,
        kv_transfer_bytes=timings.transfer_bytes if timings else 0,
    )


async def run_load(
    config: LoadConfig,
    prompts: Sequence[BenchPrompt],
    *,
    progress: Callable[[int, int, int], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every prompt (Poisson arrivals at ``request_rate``); records in order, and seconds."""
    rng = np.random.default_rng(config.seed)
    semaphore = asyncio.Semaphore(config.max_concurrency or len(prompts) or 1)
    records: list[RequestRecord | None] = [None] * len(prompts)
    done = failed = 0
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx2.Timeout(config.timeout_s, connect=30.0)

    async with httpx2.AsyncClient(
        base_url=config.base_url, timeout=timeout, limits=limits
    ) as client:

        async def send(index: int, item: BenchPrompt) -> None:
            nonlocal done, failed
            async with semaphore:
                record = await _one(client, config, item)
            records[index] = record
            done += 1
            failed += not record.ok
            if progress is not None:
                progress(done, len(prompts), failed)

        started = time.perf_counter()
        tasks = []
        for index, item in enumerate(prompts):
            tasks.append(asyncio.create_task(send(index, item)))
            if math.isfinite(config.request_rate) and index < len(prompts) - 1:
                await asyncio.sleep(float(rng.exponential(1.0 / config.request_rate)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return [r for r in records if r is not None], duration


async def prefix_ttft_probe(
    base_url: str,
    model: str,
    *,
    prompt_len: int,
    repeats: int,
    vocab_size: int,
    seed: int,
    timeout_s: float = 600.0,
) -> tuple[list[float], list[float]]:
    """TTFT (seconds) of fresh random prompts, cold, then each again with a new last token.

    The second request finds every full block but the last in the prefix cache, so the pair
    isolates what prefix reuse saves. Pairs run one after the other, never overlapping.
    """
    # A seed of its own, so probe prompts never share a prefix with the dataset's.
    rng = np.random.default_rng(seed + 7919)
    lo, hi = token_range(vocab_size)
    config = LoadConfig(base_url=base_url, model=model, timeout_s=timeout_s)
    cold: list[float] = []
    cached: list[float] = []
    async with httpx2.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
        for _ in range(repeats):
            prompt = rng.integers(lo, hi, prompt_len).tolist()
            variant = [*prompt[:-1], int(rng.integers(lo, hi))]
            for target, tokens in ((cold, prompt), (cached, variant)):
                record = await _one(client, config, BenchPrompt(tokens, 2))
                if not record.ok:
                    raise BenchError(f"prefix probe request failed: {record.error}")
                target.append(record.ttft_s)
    return cold, cached


def prefix_ttft_result(
    cold_s: Sequence[float], cached_s: Sequence[float], *, prompt_len: int, model: str
) -> dict[str, Any]:
    """One result: median TTFT with the prefix cached, the cold median as its baseline."""
    return result_entry(
        f"ttft {prompt_len}-token prompt, prefix cached",
        metric="latency_p50",
        unit="ms",
        value=float(np.median(cached_s)) * 1000.0,
        baseline_name=f"ttft {prompt_len}-token prompt, cold",
        baseline_value=float(np.median(cold_s)) * 1000.0,
        higher_is_better=False,
        params={
            "model": model,
            "prompt_len": prompt_len,
            "repeats": len(cold_s),
            "cold_ms": [t * 1000.0 for t in cold_s],
            "cached_ms": [t * 1000.0 for t in cached_s],
            "client": "streaming /v1/completions, first text chunk",
        },
    )


def per_request_rows(summaries: Sequence[Summary]) -> list[dict[str, Any]]:
    """One row per request of every run (times in seconds), for ``--per-request`` files."""
    return [
        {"run": s.label, "index": index, **dataclasses.asdict(record)}
        for s in summaries
        for index, record in enumerate(s.records)
    ]


def format_probe(result: dict[str, Any]) -> str:
    """One line for a ``prefix_ttft_result``."""
    return (
        f"{result['baseline']['name']}: {result['baseline']['value']:.1f} ms; "
        f"{result['name']}: {result['value']:.1f} ms ({result['ratio']:.1f}x faster)"
    )


# ---- server-side counters ----------------------------------------------------------------

# Counters of a kvstack server, diffed over a run (another server simply lacks them).
SERVER_COUNTERS = (
    "kvstack_serve_prefix_cache_query_tokens_total",
    "kvstack_serve_prefix_cache_hit_tokens_total",
    "kvstack_serve_preemptions_total",
)


def scrape_counters(base_url: str, *, timeout_s: float = 30.0) -> dict[str, float]:
    """Totals of ``SERVER_COUNTERS`` from ``GET /metrics``; empty when there are none."""
    try:
        response = httpx2.get(f"{base_url}/metrics", timeout=timeout_s)
    except httpx2.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    totals: dict[str, float] = {}
    for line in response.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in SERVER_COUNTERS:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` for the counters both scrapes saw."""
    return {name: after[name] - before[name] for name in after if name in before}


# ---- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """Aggregates of one run; latencies in milliseconds, throughputs per second."""

    label: str
    completed: int
    failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    server: dict[str, float] = field(default_factory=dict)  # counter deltas over the run
    records: tuple[RequestRecord, ...] = ()

    @property
    def prefix_hit_rate(self) -> float:
        """Cached prompt tokens / prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _stats_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    array = np.asarray(values) * 1000.0
    return {
        "mean": float(array.mean()),
        **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES},
    }


def _tpot_s(r: RequestRecord) -> float | None:
    return (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1) if r.completion_tokens > 1 else None


def summarize(
    label: str,
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    slo_ms: dict[str, float],
    server: dict[str, float] | None = None,
) -> Summary:
    """Aggregate records; ``slo_ms`` maps ``ttft``/``tpot``/``e2el`` to limits for goodput."""
    ok = [r for r in records if r.ok]
    tpots = [t for r in ok if (t := _tpot_s(r)) is not None]
    latency = {
        "ttft": _stats_ms([r.ttft_s for r in ok]),
        "tpot": _stats_ms(tpots),
        "itl": _stats_ms([gap for r in ok for gap in r.itl_s]),
        "e2el": _stats_ms([r.e2e_s for r in ok]),
    }
    goodput = None
    if slo_ms:

        def meets(r: RequestRecord) -> bool:
            measured = {"ttft": r.ttft_s, "tpot": _tpot_s(r) or 0.0, "e2el": r.e2e_s}
            return all(measured[k] * 1000.0 <= limit for k, limit in slo_ms.items())

        goodput = sum(meets(r) for r in ok) / duration_s if duration_s > 0 else 0.0
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    safe = duration_s if duration_s > 0 else math.inf
    return Summary(
        label=label,
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        prompt_tokens=prompt_tokens,
        output_tokens=out_tokens,
        cached_tokens=sum(r.cached_tokens for r in ok),
        request_throughput=len(ok) / safe,
        output_throughput=out_tokens / safe,
        total_token_throughput=(out_tokens + prompt_tokens) / safe,
        goodput=goodput,
        latency_ms=latency,
        errors=tuple(sorted({r.error for r in records if r.error})),
        server=dict(server or {}),
        records=tuple(records),
    )


def format_summaries(summaries: Sequence[Summary]) -> str:
    """A plain-text table, one column per run."""
    rows: list[tuple[str, list[str]]] = [
        ("completed / failed", [f"{s.completed} / {s.failed}" for s in summaries]),
        ("duration (s)", [f"{s.duration_s:.2f}" for s in summaries]),
        ("request throughput (req/s)", [f"{s.request_throughput:.2f}" for s in summaries]),
        ("output throughput (tok/s)", [f"{s.output_throughput:.1f}" for s in summaries]),
        ("total token throughput (tok/s)", [f"{s.total_token_throughput:.1f}" for s in summaries]),
        ("prefix cache hit rate", [f"{s.prefix_hit_rate:.1%}" for s in summaries]),
    ]
    if any(s.goodput is not None for s in summaries):
        rows.append(
            (
                "goodput (req/s)",
                [f"{s.goodput:.2f}" if s.goodput is not None else "-" for s in summaries],
            )
        )
    if any(s.server for s in summaries):
        queries, hits, preempt = SERVER_COUNTERS

        def hit_rate(s: Summary) -> str:
            asked = s.server.get(queries, 0.0)
            return f"{s.server.get(hits, 0.0) / asked:.1%}" if asked else "-"

        rows.append(("server: prefix cache hit rate", [hit_rate(s) for s in summaries]))
        rows.append(
            ("server: preemptions", [f"{s.server.get(preempt, 0.0):.0f}" for s in summaries])
        )
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            rows.append(
                (
                    f"{metric.upper()} {stat} (ms)",
                    [f"{s.latency_ms[metric][stat]:.1f}" for s in summaries],
                )
            )
    width = max(len(name) for name, _ in rows)
    header = " " * width + "".join(f"  {s.label:>16}" for s in summaries)
    lines = [header] + [
        name.ljust(width) + "".join(f"  {v:>16}" for v in values) for name, values in rows
    ]
    for s in summaries:
        lines.extend(f"{s.label}: error: {e}" for e in s.errors[:5])
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "kvstack-serve"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def result_entry(
    name: str,
    *,
    metric: str,
    unit: str,
    value: float,
    baseline_name: str,
    baseline_value: float,
    higher_is_better: bool,
    params: dict[str, Any],
    target: float | None = None,
) -> dict[str, Any]:
    """One ``kvstack-bench/1`` result; ``ratio`` oriented so that higher is better for us."""
    if higher_is_better:
        ratio = value / baseline_value if baseline_value else 0.0
    else:
        ratio = baseline_value / value if value else 0.0
    return {
        "name": name,
        "metric": metric,
        "unit": unit,
        "value": value,
        "baseline": {"name": baseline_name, "value": baseline_value},
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        "target": target,
        "limit": None,
        "params": params,
    }


def bench_document(
    results: list[dict[str, Any]], *, suite: str = "serve", gpu: str | None = None
) -> dict[str, Any]:
    """A complete ``kvstack-bench/1`` document (see tools/bench/SCHEMA.md)."""
    return {
        "schema": SCHEMA_ID,
        "suite": suite,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count() or 1, "gpu": gpu},
        "versions": _versions(),
        "results": results,
    }


def load_results(
    loaded: Summary, baseline: Summary, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """The headline results of a load run against its one-at-a-time baseline."""
    base_name = f"{baseline.label} (1 request at a time)"
    out = [
        result_entry(
            f"{loaded.label}: output throughput",
            metric="throughput",
            unit="tok/s",
            value=loaded.output_throughput,
            baseline_name=base_name,
            baseline_value=baseline.output_throughput,
            higher_is_better=True,
            params=params,
        ),
        result_entry(
            f"{loaded.label}: request throughput",
            metric="throughput",
            unit="req/s",
            value=loaded.request_throughput,
            baseline_name=base_name,
            baseline_value=baseline.request_throughput,
            higher_is_better=True,
            params=params,
        ),
    ]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("p50", "p99"):
            value, base = loaded.latency_ms[metric][stat], baseline.latency_ms[metric][stat]
            if math.isnan(value) or math.isnan(base):
                continue
            out.append(
                result_entry(
                    f"{loaded.label}: {metric} {stat}",
                    metric=f"latency_{stat}",
                    unit="ms",
                    value=value,
                    baseline_name=base_name,
                    baseline_value=base,
                    higher_is_better=False,
                    params=params,
                )
            )
    if loaded.goodput is not None and baseline.goodput is not None:
        out.append(
            result_entry(
                f"{loaded.label}: goodput",
                metric="goodput",
                unit="req/s",
                value=loaded.goodput,
                baseline_name=base_name,
                baseline_value=baseline.goodput,
                higher_is_better=True,
                params=params,
            )
        )
    return out


def progress_printer(label: str) -> Callable[[int, int, int], None]:
    """A progress line on stderr, redrawn in place."""

    def show(done: int, total: int, failed: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(
            f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} failed {failed}"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
