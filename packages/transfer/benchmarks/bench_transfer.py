"""The transfer benchmark, run by `nox -s bench`: a thin entry to `kvstack-transfer bench`.

Usage: ``python packages/transfer/benchmarks/bench_transfer.py [--quick] [--json PATH]``.
The cases, baselines and JSON schema live in ``kvstack.transfer._bench`` so that the console
script works from an installed wheel too.
"""

from __future__ import annotations

import sys

from kvstack.transfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
