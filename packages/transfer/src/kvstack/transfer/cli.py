"""``kvstack-transfer``: the metadata server and the benchmark."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from kvstack.transfer import _env
from kvstack.transfer._bench import format_table, run_bench
from kvstack.transfer._metadata_server import MetadataServer

__all__ = ["main"]

logger = logging.getLogger("kvstack.transfer.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstack-transfer", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", help="logging level on stderr (DEBUG, INFO, WARNING)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    meta = sub.add_parser("metadata", help="run the embedded metadata server (HTTP)")
    meta.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    meta.add_argument(
        "--port",
        type=int,
        default=_env.DEFAULT_METADATA_PORT,
        help=f"port to bind; 0 picks a free one (default {_env.DEFAULT_METADATA_PORT})",
    )
    meta.add_argument(
        "--token",
        default=None,
        help=f"shared secret clients must send (default: ${_env.TOKEN_VAR}, if set)",
    )
    bench = sub.add_parser("bench", help="benchmark shm/tcp/cuda against their baselines")
    bench.add_argument("--json", metavar="PATH", help="also write kvstack-bench/1 JSON to PATH")
    bench.add_argument(
        "--quick", action="store_true", help="small sizes and few reps: a smoke test in seconds"
    )
    return parser


def _metadata(args: argparse.Namespace) -> int:
    token = args.token or _env.token()  # never a default shown by --help: it is a secret
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "serving on %s without a token: anyone who can reach it may register", args.host
        )

    async def serve() -> None:
        server = MetadataServer(host=args.host, port=args.port, token=token)
        await server.start()
        # The one stdout line: scripts and test fixtures read the bound port from it.
        print(
            f"kvstack-transfer metadata listening on http://{args.host}:{server.port}", flush=True
        )
        await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        logger.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    document = run_bench(quick=args.quick, progress=lambda case: logger.info("bench: %s", case))
    print(format_table(document), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        logger.info("wrote %s", args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "metadata":
        return _metadata(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
