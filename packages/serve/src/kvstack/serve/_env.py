"""Environment variables read by kvstack.serve, all in one place."""

from __future__ import annotations

import os

__all__ = ["torch_threads", "triton_interpreter"]


def triton_interpreter() -> bool:
    """``TRITON_INTERPRET``: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def torch_threads() -> int:
    """``KVSTACK_SERVE_THREADS``: CPU threads for torch in the server.

    Unset: half the CPUs, at most 8. Measured on the 2-core CI box under load from other jobs:
    SmolLM2's forward over 40 tokens took 2.6-3.3 s with 2 threads and 0.2-0.3 s with 1, since
    OpenMP's barriers spin against the other processes.
    """
    value = os.environ.get("KVSTACK_SERVE_THREADS", "").strip()
    if not value:
        return max(1, min(8, (os.cpu_count() or 2) // 2))
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"KVSTACK_SERVE_THREADS={value!r} is not an integer") from None
    if threads < 1:
        raise ValueError(f"KVSTACK_SERVE_THREADS={value!r} must be at least 1")
    return threads
