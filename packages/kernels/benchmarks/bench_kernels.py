"""Issue 5's kernel benchmarks: ``python packages/kernels/benchmarks/bench_kernels.py``.

The cases live in ``kvstack.kernels._bench`` so the installed ``kvstack-kernels bench`` runs
them too; this script is the same command line, for ``nox -s bench`` and for running from a
checkout. Example (GPU machine)::

    python packages/kernels/benchmarks/bench_kernels.py --json results/kernels.json
    python packages/kernels/benchmarks/bench_kernels.py --quick
"""

from __future__ import annotations

import sys

from kvstack.kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
