"""Environment variables read by kvstack.kernels, all in one place."""

from __future__ import annotations

import os

__all__ = ["triton_interpreter_enabled"]


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is on: kernels then run on CPU tensors, one program at a time.

    Triton reads the variable when it is imported; read it the same way here so launchers accept
    CPU tensors exactly when Triton will run them.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
