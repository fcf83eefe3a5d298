"""Errors raised by kvstack.kernels.

The hierarchy::

    KernelError                          base of every error raised here
    ├── InvalidInput (ValueError)        a tensor argument the kernel cannot take
    │   ├── BadShape                     wrong rank or a size that disagrees with another input
    │   ├── BadDtype (TypeError)         a dtype the kernel does not support or that mismatches
    │   ├── BadDevice                    tensors on different devices, or not on a Triton device
    │   └── BadLayout                    strides the kernel cannot address (not contiguous)
    ├── UnsupportedConfig (ValueError)   a scalar option out of range (window, soft-cap, segments)
    └── DeviceUnavailable (RuntimeError) no CUDA device and no Triton interpreter to run on

Every error carries the offending argument's name and a reason as attributes, puts both in its
message, and pickles (errors cross process boundaries in the serving stack).
"""

from __future__ import annotations

__all__ = [
    "BadDevice",
    "BadDtype",
    "BadLayout",
    "BadShape",
    "DeviceUnavailable",
    "InvalidInput",
    "KernelError",
    "UnsupportedConfig",
]


class KernelError(Exception):
    """Base of every error raised by kvstack.kernels."""


class InvalidInput(KernelError, ValueError):
    """A tensor argument the kernel cannot take; ``.name`` is the argument, ``.reason`` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str]]:
        return (type(self), (self.name, self.reason))


class BadShape(InvalidInput):
    """Wrong rank, or a size that disagrees with another input."""


class BadDtype(InvalidInput, TypeError):
    """A dtype the kernel does not support, or one that differs from another input's."""


class BadDevice(InvalidInput):
    """Tensors on different devices, or on a device Triton cannot run on."""


class BadLayout(InvalidInput):
    """Strides the kernel cannot address (the inner dimensions must be contiguous)."""


class UnsupportedConfig(KernelError, ValueError):
    """A scalar option out of range; ``.name`` is the option, ``.value`` what was given."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"{name}={value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason

    def __reduce__(self) -> tuple[type[UnsupportedConfig], tuple[str, object, str]]:
        return (type(self), (self.name, self.value, self.reason))


class DeviceUnavailable(KernelError, RuntimeError):
    """No CUDA device is visible and the Triton interpreter is off (``TRITON_INTERPRET=1``)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs a CUDA device (none is visible); set TRITON_INTERPRET=1 before "
            "importing triton to run on the CPU interpreter instead"
        )
        self.what = what

    def __reduce__(self) -> tuple[type[DeviceUnavailable], tuple[str]]:
        return (type(self), (self.what,))
