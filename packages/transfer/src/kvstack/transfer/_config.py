"""EngineConfig and the size/duration parsing shared by the API and the command line."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from kvstack.transfer import _env
from kvstack.transfer.errors import ConfigError

__all__ = ["TRANSPORT_NAMES", "EngineConfig", "format_size", "parse_size"]

# Preference order when several transports can reach a peer: fastest first.
TRANSPORT_NAMES: tuple[str, ...] = ("local", "cuda", "shm", "tcp")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str | int) -> int:
    """Parse "4GiB", "64MiB", "512K", "1000" into bytes; raise ConfigError naming the text."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size {text} is negative")
        return text
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(f"cannot parse size {text!r} (expected e.g. '64MiB', '4GiB', '4096')")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    if unit.endswith("IB") or unit.endswith("I"):
        scale = 1024 ** ("KMGT".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit.rstrip("B") if unit != "B" else "B"]
    return int(number * scale)


def format_size(size_bytes: int) -> str:
    """4096 -> "4 KiB", 67108864 -> "64 MiB"."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes >= scale and size_bytes % scale == 0:
            return f"{size_bytes // scale} {unit}"
    return f"{size_bytes} B"


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"EngineConfig.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Configuration of one Engine. Sizes in bytes, durations in seconds.

    Defaults come from KVSTACK_TRANSFER_* variables (see _env.py) where one exists.
    """

    # Metadata service: http://host:port (embedded server, default), redis://host:port/db, memory://
    metadata_url: str = field(default_factory=_env.metadata_url)
    # Address the tcp server binds and advertises to peers; 127.0.0.1 unless told otherwise.
    host: str = field(default_factory=_env.host)
    # 0 picks a free port.
    tcp_port: int = 0
    # Shared secret for control connections (tcp hello, metadata HTTP); None disables the check.
    token: str | None = field(default_factory=_env.token)
    # Enabled transports in order of preference; the first that can reach a peer is used.
    transports: tuple[str, ...] = field(
        default_factory=lambda: _env.transports() or TRANSPORT_NAMES
    )
    # Connections per tcp peer; large requests are striped over all of them.
    tcp_connections: int = 4
    # Requests larger than this are cut into stripes of this size across the connections.
    tcp_stripe_bytes: int = 4 << 20
    # Deadline of a request that does not carry its own.
    request_timeout_s: float = 30.0
    # Bound on every connect to a peer or to the metadata service.
    connect_timeout_s: float = 5.0
    # Metadata entries expire this long after the owner's last heartbeat: a dead host's
    # segments vanish.
    metadata_ttl_s: float = 10.0
    # Prometheus exporter port on 127.0.0.1; None disables it.
    metrics_port: int | None = field(default_factory=_env.metrics_port)

    def __post_init__(self) -> None:
        if not isinstance(self.metadata_url, str) or "://" not in self.metadata_url:
            raise ConfigError(
                f"EngineConfig.metadata_url must look like 'http://host:port', 'redis://host:port' "
                f"or 'memory://', got {self.metadata_url!r}"
            )
        if not self.host:
            raise ConfigError(f"EngineConfig.host must be an address, got {self.host!r}")
        if not (isinstance(self.tcp_port, int) and 0 <= self.tcp_port <= 65535):
            raise ConfigError(f"EngineConfig.tcp_port must be 0..65535, got {self.tcp_port!r}")
        if not self.transports:
            raise ConfigError("EngineConfig.transports must name at least one transport")
        for name in self.transports:
            if name not in TRANSPORT_NAMES:
                raise ConfigError(
                    f"EngineConfig.transports names unknown transport {name!r} "
                    f"(known: {', '.join(TRANSPORT_NAMES)})"
                )
        if not (isinstance(self.tcp_connections, int) and 1 <= self.tcp_connections <= 64):
            raise ConfigError(
                f"EngineConfig.tcp_connections must be 1..64, got {self.tcp_connections!r}"
            )
        if not (isinstance(self.tcp_stripe_bytes, int) and self.tcp_stripe_bytes >= 4096):
            raise ConfigError(
                f"EngineConfig.tcp_stripe_bytes must be >= 4096, got {self.tcp_stripe_bytes!r}"
            )
        _check_positive("request_timeout_s", self.request_timeout_s)
        _check_positive("connect_timeout_s", self.connect_timeout_s)
        _check_positive("metadata_ttl_s", self.metadata_ttl_s)
        if self.metrics_port is not None and not (0 <= self.metrics_port <= 65535):
            raise ConfigError(
                f"EngineConfig.metrics_port must be 0..65535, got {self.metrics_port!r}"
            )
