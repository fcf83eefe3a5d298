"""Rates of the native copier on this machine: sizes x threads x streaming stores.

Usage: ``python packages/transfer/benchmarks/copy_rates.py``. Copies a random source into
rotating slots of a prefaulted 512 MiB shm segment (so the destination is cold, as a put into a
store node's memory is) and prints the median GB/s per case. It informs the copier's
thresholds (``_memory.SHARED_COPY_BYTES``, when to stream); RESULTS.md has its numbers.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from kvstack.transfer import _native
from kvstack.transfer._memory import ShmRegion

MiB = 1 << 20
SLOTS_BYTES = 256 * MiB


def main() -> int:
    copier = _native.load()
    if copier is None:
        print("the native copier is unavailable here (see the log line above)", file=sys.stderr)
        return 1
    region = ShmRegion.create(2 * SLOTS_BYTES, prefault=True)
    try:
        base = region.address
        for size in (MiB, 4 * MiB, 16 * MiB, 64 * MiB):
            src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
            slots = SLOTS_BYTES // size
            row = []
            for threads in (1, 2, 4, 8):
                for stream in (False, True):
                    seconds = []
                    for i in range(max(8, min(200, slots))):
                        dst = base + (i * 7 % slots) * size
                        start = time.perf_counter()
                        copier.copy_ranges(
                            np.array([dst]),
                            np.array([src.ctypes.data]),
                            np.array([size]),
                            threads=threads,
                            stream=stream,
                        )
                        seconds.append(time.perf_counter() - start)
                    rate = size / float(np.median(seconds)) / 1e9
                    row.append(f"t{threads}{'s' if stream else ''} {rate:.1f}")
            print(f"{size // MiB} MiB GB/s: " + " ".join(row), flush=True)
    finally:
        region.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
