"""Run the kernels on the Triton interpreter when no CUDA device is visible.

``@triton.jit`` picks the interpreter when the decorated module is imported, so the variable is
set here, before any test module imports kvstack.kernels (conftest modules come first). On the
GPU machine it is left alone and the same CPU-sized tests run on the device.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a device there is nothing else to run on, whatever the environment said.
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    from kvstack.kernels.cache_write import _kernel

    if not isinstance(_kernel.cache_write_kernel, InterpretedFunction):
        raise pytest.UsageError(
            "kvstack.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels "
            "were compiled for a GPU; run pytest with TRITON_INTERPRET=1 in the environment"
        )
