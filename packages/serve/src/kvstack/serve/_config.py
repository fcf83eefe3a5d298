"""Configuration of the engine and the server, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvstack.serve.errors import ConfigError

__all__ = ["EngineConfig", "ServerConfig", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"4GiB"``, ``"1000"`` → bytes; raises ConfigError."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError("size", text, "expected a number with an optional unit such as 512MiB")
    unit = (match.group(2) or "B").lower()
    return int(float(match.group(1)) * _UNITS[unit])


def _check_timeout(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(field, value, "must be a positive number of seconds")


def _positive(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, value, "must be a positive integer")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The engine: KV cache size and layout, batching limits, device.

    ``num_blocks`` wins over ``kv_cache_bytes`` when given. ``max_model_len`` (tokens) defaults
    to the model's context, capped by what the cache holds.
    """

    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    num_blocks: int | None = None
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 32
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("kv_cache_bytes", self.kv_cache_bytes)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError("dtype", self.dtype, "must be float32, float16 or bfloat16")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(
                "attention_backend", self.attention_backend, "must be auto, torch or triton"
            )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP server: where it binds and what it calls its model."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    request_timeout_s: float = 600.0
    # Disaggregation: "colocated", "prefill" or "decode" (see _disagg.py).
    mode: str = "colocated"
    # Transfer metadata service (http://, redis://, memory://) for PD KV handoffs; None: the
    # KVSTACK_TRANSFER_METADATA default.
    transfer_metadata_url: str | None = None
    # Store master (host:port) for global prefix reuse; None: no store.
    store_master: str | None = None
    # Decode side: reserve + prefill + push must finish within this; prefill side: one push.
    handoff_timeout_s: float = 60.0
    push_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("colocated", "prefill", "decode"):
            raise ConfigError("mode", self.mode, "must be colocated, prefill or decode")
        _check_timeout("handoff_timeout_s", self.handoff_timeout_s)
        _check_timeout("push_timeout_s", self.push_timeout_s)
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError("port", self.port, "must be in 0..65535 (0 picks a free port)")
        if not self.request_timeout_s > 0:
            raise ConfigError("request_timeout_s", self.request_timeout_s, "must be positive")
