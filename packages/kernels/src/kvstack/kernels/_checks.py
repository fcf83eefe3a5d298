"""Input checks shared by the launchers: each raises an error naming the tensor and its shape."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from kvstack.kernels._env import triton_interpreter_enabled
from kvstack.kernels.errors import BadDevice, BadDtype, BadLayout, BadShape

__all__ = [
    "INDEX_DTYPES",
    "bits_view",
    "check_dtype",
    "check_inner_contiguous",
    "check_ndim",
    "check_same_device",
    "check_size",
    "dtype_name",
    "shape_of",
]

# Block tables, slot mappings and offsets: int32 like vLLM, int64 where callers already hold it.
INDEX_DTYPES = (torch.int32, torch.int64)


def shape_of(tensor: torch.Tensor) -> str:
    """``[4, 16, 2, 64]``: a shape as the messages print it."""
    return "[" + ", ".join(str(s) for s in tensor.shape) + "]"


def dtype_name(dtype: torch.dtype) -> str:
    """``float16``: a dtype without the ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """Raise BadShape unless ``tensor`` has ``ndim`` dimensions (``layout`` names them)."""
    if tensor.dim() != ndim:
        raise BadShape(name, f"has shape {shape_of(tensor)}; expected {layout}")


def check_size(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """Raise BadShape unless ``tensor.shape[dim] == expected`` (``what``: where that comes from)."""
    if tensor.shape[dim] != expected:
        raise BadShape(
            name,
            f"has shape {shape_of(tensor)}; dimension {dim} must be {expected} ({what})",
        )


def check_dtype(name: str, tensor: torch.Tensor, allowed: Collection[torch.dtype]) -> None:
    """Raise BadDtype unless ``tensor.dtype`` is one of ``allowed``."""
    if tensor.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise BadDtype(
            name,
            f"has dtype {dtype_name(tensor.dtype)} (shape {shape_of(tensor)}); expected {names}",
        )


def check_inner_contiguous(name: str, tensor: torch.Tensor, first_dim: int) -> None:
    """Raise BadLayout unless dimensions ``first_dim..`` are packed row-major (stride 1 last).

    The outer dimensions may have any stride, so K and V views of one interleaved cache
    (``kv_cache.unbind(1)``) are accepted.
    """
    expected = 1
    for dim in range(tensor.dim() - 1, first_dim - 1, -1):
        if tensor.shape[dim] != 1 and tensor.stride(dim) != expected:
            raise BadLayout(
                name,
                f"has shape {shape_of(tensor)} and strides {list(tensor.stride())}; "
                f"dimensions {first_dim}.. must be contiguous",
            )
        expected *= tensor.shape[dim]


def check_same_device(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    """Raise BadDevice unless all tensors share one device Triton can run on; return it."""
    items = list(tensors.items())
    first_name, first = items[0]
    device = first.device
    for name, tensor in items[1:]:
        if tensor.device != device:
            raise BadDevice(
                name, f"is on {tensor.device} but {first_name} is on {device}; use one device"
            )
    if device.type == "cuda":
        return device
    if device.type == "cpu" and triton_interpreter_enabled():
        return device
    raise BadDevice(
        first_name,
        f"is on {device}; Triton kernels run on CUDA tensors "
        "(or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported)",
    )


# Integer dtype of each element size: copies move bits through these views, so every dtype (bf16
# and fp8 included, which the interpreter mishandles in arithmetic) round-trips bit-exactly.
_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as the integer dtype of the same element size."""
    return tensor.view(_BITS_DTYPES[tensor.element_size()])
