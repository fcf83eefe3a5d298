"""The one seam between typed launchers and Triton's untyped launch call, plus shape arithmetic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from triton.runtime.jit import JITFunction

__all__ = ["cdiv", "launch", "next_power_of_2"]


def launch(
    kernel: JITFunction[Any], grid: tuple[int, ...], device: torch.device
) -> Callable[..., Any]:
    """``kernel[grid]`` on ``device``, typed as taking keywords.

    Triton types ``kernel[grid]`` as the Python signature of the ``@triton.jit`` function, which
    says neither that constexpr parameters take plain ints nor that the launch also takes
    ``num_warps``/``num_stages``. Launchers build and check every argument themselves, then launch
    by keyword through here; the call returns the compiled kernel (its ``.asm`` holds PTX/SASS;
    None on the interpreter). Triton launches on the current CUDA device, not the tensors', so
    the call makes ``device`` current.
    """
    launcher = kernel[grid]
    if device.type != "cuda":
        return launcher

    def on_device(*args: Any, **kwargs: Any) -> Any:
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return on_device


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
