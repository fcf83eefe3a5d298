"""Triton kernels for the serving path (paged attention, KV page movement, the FP8
accumulator-precision probe), each beside the PyTorch reference that defines it.

One subpackage per kernel: ``paged_attention``, ``cache_write``, ``page_pack`` and
``acc_probe``, each with its launcher (``__init__``), ``reference``, ``_kernel`` (the
``@triton.jit`` code) and ``_heuristics`` (launch configuration from shapes). Launchers check
their inputs and raise the errors of ``kvstack.kernels.errors``, naming the bad tensor.
"""

from kvstack.kernels.acc_probe import (
    ProbeConfig,
    ProbeResult,
    format_probe_table,
    run_probe,
    truncated_matmul,
    truncated_matmul_reference,
)
from kvstack.kernels.cache_write import write_kv_cache, write_kv_cache_reference
from kvstack.kernels.errors import (
    BadDevice,
    BadDtype,
    BadLayout,
    BadShape,
    DeviceUnavailable,
    InvalidInput,
    KernelError,
    UnsupportedConfig,
)
from kvstack.kernels.page_pack import (
    pack_pages,
    pack_pages_reference,
    unpack_pages,
    unpack_pages_reference,
)
from kvstack.kernels.paged_attention import (
    AttentionConfig,
    paged_attention,
    paged_attention_reference,
)

__all__ = [
    "AttentionConfig",
    "BadDevice",
    "BadDtype",
    "BadLayout",
    "BadShape",
    "DeviceUnavailable",
    "InvalidInput",
    "KernelError",
    "ProbeConfig",
    "ProbeResult",
    "UnsupportedConfig",
    "format_probe_table",
    "pack_pages",
    "pack_pages_reference",
    "paged_attention",
    "paged_attention_reference",
    "run_probe",
    "truncated_matmul",
    "truncated_matmul_reference",
    "unpack_pages",
    "unpack_pages_reference",
    "write_kv_cache",
    "write_kv_cache_reference",
]
