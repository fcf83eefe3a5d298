"""The public surface changes only on purpose, and errors keep their fields across pickling."""

from __future__ import annotations

import pickle

import pytest

import kvstack.kernels
from kvstack.kernels import errors


def test_public_names() -> None:
    assert kvstack.kernels.__all__ == [
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
    assert kvstack.kernels.__all__ == sorted(kvstack.kernels.__all__)
    for name in kvstack.kernels.__all__:
        assert hasattr(kvstack.kernels, name)


@pytest.mark.parametrize(
    "error",
    [
        errors.BadShape("query", "has shape [2, 3]; expected [num_tokens, heads, head_size]"),
        errors.BadDtype("key_cache", "has dtype float32 but query has float16"),
        errors.BadDevice("out", "is on cpu but query is on cuda:0; use one device"),
        errors.BadLayout("kv_cache", "dimensions 2.. must be contiguous"),
        errors.UnsupportedConfig("num_segments", 3, "must be a power of two"),
        errors.DeviceUnavailable("kvstack-kernels bench"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_and_keep_fields(error: errors.KernelError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
    assert isinstance(copy, errors.KernelError)


def test_builtin_bases() -> None:
    assert issubclass(errors.InvalidInput, ValueError)
    assert issubclass(errors.BadDtype, TypeError)
    assert issubclass(errors.UnsupportedConfig, ValueError)
    assert issubclass(errors.DeviceUnavailable, RuntimeError)
    assert str(errors.BadShape("query", "has shape [1]")) == "query: has shape [1]"
