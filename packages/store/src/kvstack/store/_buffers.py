"""Turning user values (bytes, buffers, numpy arrays, torch tensors) into flat uint8 views."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvstack.store.errors import InvalidArgument

__all__ = ["byte_view", "empty_tensor", "is_torch_tensor", "tensor_attrs"]


def is_torch_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to find out
    return torch is not None and isinstance(value, torch.Tensor)


def byte_view(value: object, *, what: str, writable: bool = False) -> np.ndarray:
    """A 1-D uint8 view of ``value``'s memory (no copy); raises InvalidArgument naming ``what``."""
    if is_torch_tensor(value):
        tensor: Any = value
        if tensor.device.type != "cpu":
            raise InvalidArgument(f"{what}: tensor on {tensor.device}; the store reads CPU memory")
        if not tensor.is_contiguous():
            raise InvalidArgument(
                f"{what}: tensor of shape {tuple(tensor.shape)} is not contiguous"
            )
        flat = tensor.detach().reshape(-1).view(sys.modules["torch"].uint8)
        return flat.numpy()
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise InvalidArgument(f"{what}: array of shape {value.shape} is not C-contiguous")
        array = value.reshape(-1).view(np.uint8)
    else:
        try:
            view = memoryview(value)  # pyrefly: ignore[bad-argument-type] -- checked at runtime
        except TypeError:
            raise InvalidArgument(
                f"{what}: expected bytes, a buffer, a numpy array or a torch tensor, "
                f"got {type(value).__name__}"
            ) from None
        if not view.c_contiguous:
            raise InvalidArgument(f"{what}: buffer is not contiguous")
        array = np.frombuffer(view.cast("B") if view.format != "B" else view, dtype=np.uint8)
    if writable and not array.flags.writeable:
        raise InvalidArgument(f"{what}: buffer is read-only")
    return array


def tensor_attrs(value: object, *, what: str) -> dict[str, Any]:
    """Library, dtype and shape of a tensor or array, as stored with the object."""
    if is_torch_tensor(value):
        tensor: Any = value
        return {
            "lib": "torch",
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
        }
    if isinstance(value, np.ndarray):
        return {"lib": "numpy", "dtype": value.dtype.str, "shape": list(value.shape)}
    raise InvalidArgument(
        f"{what}: expected a numpy array or a torch tensor, got {type(value).__name__}"
    )


def empty_tensor(attrs: dict[str, Any], *, key: str) -> Any:
    """An uninitialised tensor or array matching stored ``attrs``."""
    shape = tuple(int(n) for n in attrs["shape"])
    if attrs.get("lib") == "torch":
        import torch  # noqa: PLC0415 -- lazily: numpy-only users never pay for it

        dtype = getattr(torch, str(attrs["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgument(f"key {key!r}: unknown torch dtype {attrs['dtype']!r}")
        return torch.empty(shape, dtype=dtype)
    if attrs.get("lib") == "numpy":
        return np.empty(shape, dtype=np.dtype(str(attrs["dtype"])))
    raise InvalidArgument(f"key {key!r} holds no tensor (attrs {attrs!r})")


def check_matches(value: object, attrs: dict[str, Any], *, key: str) -> None:
    """Raise InvalidArgument unless ``value`` has the stored dtype and shape."""
    have = tensor_attrs(value, what=f"tensor for key {key!r}")
    if have["dtype"] != attrs.get("dtype") or have["shape"] != list(attrs.get("shape") or []):
        raise InvalidArgument(
            f"key {key!r} holds dtype {attrs.get('dtype')} shape {attrs.get('shape')}, "
            f"but the destination has dtype {have['dtype']} shape {have['shape']}"
        )
