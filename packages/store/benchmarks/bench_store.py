"""The store benchmark, run by `nox -s bench`: a thin entry to `kvstack-store bench`.

Usage: ``python packages/store/benchmarks/bench_store.py [--quick] [--threads N] [--json PATH]``.
The cases, baselines (a real redis-server; the transfer engine on the same path) and the JSON
document live in ``kvstack.store._bench`` so that the console script works from a wheel too.
"""

from __future__ import annotations

import sys

from kvstack.store.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
