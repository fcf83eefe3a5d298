"""``kvstack-store``: run a master or a node, print a store's stats, benchmark it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from kvstack.store import _env
from kvstack.store._bench import format_table, run_bench
from kvstack.store._config import ClientConfig, MasterConfig, NodeConfig, parse_size
from kvstack.store._master import Master, new_master_loop
from kvstack.store._node import StoreNode
from kvstack.store._wire import MasterConnection, Op
from kvstack.store.errors import StoreError
from kvstack.transfer import TransferError

__all__ = ["main"]

logger = logging.getLogger("kvstack.store.cli")

# The master process polls this long after each request before sleeping: a request that
# follows within it skips the wake-up (issue 4, see _master._BusyPollSelector).
_BUSY_POLL_US = 200.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstack-store", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", help="logging level on stderr (DEBUG, INFO, WARNING)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    master = sub.add_parser("master", help="run the master (metadata, allocation, membership)")
    master.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    master.add_argument(
        "--port",
        type=int,
        default=_env.DEFAULT_MASTER_PORT,
        help=f"port to bind; 0 picks a free one (default {_env.DEFAULT_MASTER_PORT})",
    )
    master.add_argument(
        "--metadata-url",
        default=None,
        help="transfer metadata service for nodes and clients (default: embed one over HTTP)",
    )
    master.add_argument(
        "--metadata-port", type=int, default=0, help="port of the embedded metadata service"
    )
    master.add_argument(
        "--data-dir", default=None, help="write-ahead log + snapshot directory (default: none)"
    )
    master.add_argument(
        "--redis-url",
        default=None,
        help="keep object metadata in Redis (redis://host:port/db) instead of --data-dir",
    )
    master.add_argument(
        "--heartbeat-timeout", type=float, default=5.0, help="seconds before a silent node is dead"
    )
    master.add_argument("--lease", type=float, default=5.0, help="read lease in seconds")
    master.add_argument(
        "--high-watermark", type=float, default=0.95, help="memory use that starts eviction"
    )
    master.add_argument(
        "--low-watermark", type=float, default=0.85, help="memory use eviction stops at"
    )
    master.add_argument(
        "--metrics-port",
        type=int,
        default=_env.metrics_port(),
        help=f"Prometheus exporter port (default ${_env.METRICS_PORT_VAR}; unset: none)",
    )
    master.add_argument(
        "--busy-poll-us",
        type=float,
        default=_BUSY_POLL_US,
        help="microseconds to poll for the next request before sleeping; 0 never polls "
        f"(default {_BUSY_POLL_US:g})",
    )

    node = sub.add_parser("node", help="run a storage node contributing memory (and disk)")
    node.add_argument(
        "--master", default=_env.master(), help=f"master host:port (default ${_env.MASTER_VAR})"
    )
    node.add_argument("--memory", default="1GiB", help="memory to contribute, e.g. 4GiB")
    node.add_argument("--segment", default="1GiB", help="largest segment (one allocator each)")
    node.add_argument("--disk", default=None, help="disk tier directory (default: none)")
    node.add_argument("--disk-size", default="16GiB", help="disk tier capacity")
    node.add_argument("--name", default=None, help="node name, stable across master restarts")
    node.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="longest back-off in seconds between failed polls of the master",
    )

    stats = sub.add_parser("stats", help="print the master's statistics as JSON")
    stats.add_argument(
        "--master", default=_env.master(), help=f"master host:port (default ${_env.MASTER_VAR})"
    )

    bench = sub.add_parser("bench", help="benchmark the store against a real redis-server")
    bench.add_argument("--json", metavar="PATH", help="also write kvstack-bench/1 JSON to PATH")
    bench.add_argument(
        "--quick", action="store_true", help="few reps and small sizes: a smoke test in seconds"
    )
    bench.add_argument("--threads", type=int, default=1, help="client threads (both systems)")
    return parser


def _master(args: argparse.Namespace) -> int:
    config = MasterConfig(
        host=args.host,
        port=args.port,
        metadata_url=args.metadata_url,
        metadata_port=args.metadata_port,
        data_dir=args.data_dir,
        redis_url=args.redis_url,
        heartbeat_timeout_s=args.heartbeat_timeout,
        lease_s=args.lease,
        high_watermark=args.high_watermark,
        low_watermark=args.low_watermark,
        metrics_port=args.metrics_port,
        busy_poll_s=args.busy_poll_us / 1e6,
    )

    async def serve() -> None:
        master = Master(config)
        await master.start()
        # The one stdout line: scripts and test fixtures read the bound address from it.
        metrics = f", metrics on port {master.metrics_port}" if master.metrics_port else ""
        print(
            f"kvstack-store master listening on {master.address} "
            f"(metadata {master.metadata_url}{metrics})",
            flush=True,
        )
        try:
            await master.serve_forever()
        finally:
            await master.close()

    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=lambda: new_master_loop(config)) as runner,
    ):
        runner.run(serve())
    return 0


def _node(args: argparse.Namespace) -> int:
    config = NodeConfig(
        master=args.master,
        memory_bytes=parse_size(args.memory, name="--memory"),
        segment_bytes=parse_size(args.segment, name="--segment"),
        disk_dir=args.disk,
        disk_bytes=parse_size(args.disk_size, name="--disk-size"),
        name=args.name,
        poll_interval_s=args.poll_interval,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with StoreNode(config) as node:
        print(f"kvstack-store node {node.name} registered with {config.master}", flush=True)
        try:
            while not stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def _stats(args: argparse.Namespace) -> int:
    ClientConfig(master=args.master)  # validates the address
    connection = MasterConnection(args.master)
    try:
        print(json.dumps(connection.call(Op.STATS, {}, timeout_s=10.0), indent=2))
    finally:
        connection.close()
    return 0


def _bench(args: argparse.Namespace) -> int:
    report = run_bench(quick=args.quick, threads=args.threads)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        logger.info("wrote %s", args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {"master": _master, "node": _node, "stats": _stats, "bench": _bench}
    try:
        return commands[args.command](args)
    except (StoreError, TransferError) as exc:
        print(f"kvstack-store {args.command}: {exc}", file=sys.stderr)
        return 1
