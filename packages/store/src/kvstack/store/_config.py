"""Configuration of the master, a node, a client, and the options of one put."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvstack.store import _env
from kvstack.store.errors import ConfigError
from kvstack.transfer import ConfigError as TransferConfigError
from kvstack.transfer import parse_size as _transfer_parse_size

__all__ = [
    "ClientConfig",
    "MasterConfig",
    "NodeConfig",
    "PutOptions",
    "parse_address",
    "parse_size",
]

# Keys are UTF-8 strings of 1..MAX_KEY_BYTES bytes (Mooncake and Redis keys are strings too).
MAX_KEY_BYTES = 1024
# Per-object user attributes (a tensor's dtype and shape) travel in the metadata; keep them small.
MAX_ATTRS_BYTES = 4096


def parse_size(text: str | int, *, name: str = "size") -> int:
    """ "4GiB" -> 4294967296; raises ConfigError naming ``name`` and the text."""
    try:
        return _transfer_parse_size(text)
    except TransferConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def parse_address(text: str, *, name: str = "address") -> tuple[str, int]:
    """ "127.0.0.1:7720" -> ("127.0.0.1", 7720); raises ConfigError naming the text."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must look like 'host:port', got {text!r}")
    return host, int(port)


def _positive(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner}.{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class MasterConfig:
    """The master: where it listens, its policies, where it persists. Durations in seconds."""

    host: str = "127.0.0.1"
    # 0 picks a free port (read it back from Master.port).
    port: int = 0
    # Transfer metadata service for nodes and clients. None: the master embeds one (HTTP) on
    # metadata_port; "memory://name" for single-process (embedded) stores.
    metadata_url: str | None = None
    metadata_port: int = 0
    # A node whose last poll is older than this is dead: its replicas leave the metadata.
    heartbeat_timeout_s: float = 5.0
    # How long a get's lease keeps the object's bytes from being evicted or reused.
    lease_s: float = 5.0
    # A put started but not committed within this is aborted and its space freed.
    put_timeout_s: float = 60.0
    # Eviction starts when memory use passes high_watermark and stops at low_watermark.
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    # Soft pins last at most this long.
    max_soft_pin_s: float = 24 * 3600.0
    # Write-ahead log + snapshot directory; None keeps metadata in memory only.
    data_dir: str | None = None
    # Keep object metadata in Redis instead (redis://host:port/db), e.g. for a standby master
    # on another host; takes precedence over data_dir.
    redis_url: str | None = None
    # Snapshot (and truncate the log) after this many logged records.
    snapshot_every: int = 100_000
    # Objects must fit one segment: allocations are never split.
    max_frame_bytes: int = 64 << 20
    metrics_port: int | None = field(default_factory=_env.metrics_port)
    # Re-replicate objects that lost a replica (background, node-to-node copies).
    rereplicate: bool = True
    # After each event the master polls this long before sleeping (see _master's
    # _BusyPollSelector). 0 for a master sharing its process (and GIL) with other work; the
    # master process (``kvstack-store master``) turns it on.
    busy_poll_s: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ConfigError(f"MasterConfig.port must be 0..65535, got {self.port!r}")
        if not (isinstance(self.metadata_port, int) and 0 <= self.metadata_port <= 65535):
            raise ConfigError(
                f"MasterConfig.metadata_port must be 0..65535, got {self.metadata_port!r}"
            )
        for name in ("heartbeat_timeout_s", "lease_s", "put_timeout_s", "max_soft_pin_s"):
            _positive("MasterConfig", name, getattr(self, name))
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError(
                "MasterConfig needs 0 < low_watermark <= high_watermark <= 1, got "
                f"low_watermark={self.low_watermark!r}, high_watermark={self.high_watermark!r}"
            )
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"MasterConfig.redis_url must look like 'redis://host:port/db', got "
                f"{self.redis_url!r}"
            )
        if not (isinstance(self.busy_poll_s, int | float) and 0 <= self.busy_poll_s <= 1):
            raise ConfigError(
                f"MasterConfig.busy_poll_s must be a number in [0, 1], got {self.busy_poll_s!r}"
            )
        if self.snapshot_every < 1:
            raise ConfigError(
                f"MasterConfig.snapshot_every must be >= 1, got {self.snapshot_every!r}"
            )


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A storage node: how much memory (and disk) it contributes."""

    master: str = field(default_factory=_env.master)
    memory_bytes: int = 1 << 30
    # Memory is contributed as segments of at most this size (one allocator each).
    segment_bytes: int = 1 << 30
    # Disk tier directory; None: evicted objects are dropped, not demoted.
    disk_dir: str | None = None
    disk_bytes: int = 16 << 30
    # Stable name across master restarts; None picks one.
    name: str | None = None
    # Longest back-off between failed polls of the master (a restarting master). Successful
    # polls repeat at once: the master holds each for up to min(0.5 s, heartbeat timeout / 4).
    poll_interval_s: float = 0.5
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        parse_address(self.master, name="NodeConfig.master")
        if not (isinstance(self.memory_bytes, int) and self.memory_bytes > 0):
            raise ConfigError(f"NodeConfig.memory_bytes must be > 0, got {self.memory_bytes!r}")
        if not (isinstance(self.segment_bytes, int) and self.segment_bytes >= 4096):
            raise ConfigError(
                f"NodeConfig.segment_bytes must be >= 4096, got {self.segment_bytes!r}"
            )
        if self.name is not None and not (0 < len(self.name) <= 64 and self.name.isprintable()):
            raise ConfigError(f"NodeConfig.name must be 1..64 printable chars, got {self.name!r}")
        _positive("NodeConfig", "poll_interval_s", self.poll_interval_s)
        _positive("NodeConfig", "request_timeout_s", self.request_timeout_s)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A client: its master, deadlines, and whether it checks every read."""

    master: str = field(default_factory=_env.master)
    # Deadline of one store operation, retries and fail-over included.
    timeout_s: float = 30.0
    # Verify the end-to-end checksum on every get (XXH3-64 of the bytes, computed at put).
    verify_checksums: bool = True
    # Threads of the AsyncStoreClient executor.
    async_workers: int = 8
    # Memory this client contributes itself (an in-process node); 0 contributes none.
    contribute_bytes: int = 0
    contribute_disk_dir: str | None = None
    # How long a request polls for the master's reply before sleeping; 0 always sleeps.
    # Polling burns up to this much CPU per request but skips the wake-up of a sleeping
    # thread, which costs tens of microseconds a round trip on small VMs (issue 4).
    reply_spin_s: float = 200e-6

    def __post_init__(self) -> None:
        parse_address(self.master, name="ClientConfig.master")
        _positive("ClientConfig", "timeout_s", self.timeout_s)
        if not (isinstance(self.reply_spin_s, int | float) and 0 <= self.reply_spin_s <= 1.0):
            raise ConfigError(
                f"ClientConfig.reply_spin_s must be in 0..1 seconds, got {self.reply_spin_s!r}"
            )
        if not (isinstance(self.async_workers, int) and self.async_workers >= 1):
            raise ConfigError(
                f"ClientConfig.async_workers must be >= 1, got {self.async_workers!r}"
            )
        if not (isinstance(self.contribute_bytes, int) and self.contribute_bytes >= 0):
            raise ConfigError(
                f"ClientConfig.contribute_bytes must be >= 0, got {self.contribute_bytes!r}"
            )


@dataclass(frozen=True, slots=True)
class PutOptions:
    """Replication of one put: how many copies on distinct nodes, pins, placement."""

    replicas: int = 1
    # Evicted last (after every unpinned object), for at most soft_pin_s seconds.
    soft_pin: bool = False
    soft_pin_s: float = 1800.0
    # Never evicted (removed only by remove()).
    hard_pin: bool = False
    # Node name tried first for the first replica.
    preferred_node: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.replicas, int) and 1 <= self.replicas <= 16):
            raise ConfigError(f"PutOptions.replicas must be 1..16, got {self.replicas!r}")
        _positive("PutOptions", "soft_pin_s", self.soft_pin_s)

    def to_wire(self) -> dict[str, object]:
        """Only the fields that differ from the master's defaults (1 replica, no pins, no
        preference, no overwrite): a smaller PUT_START to encode and decode (issue 4)."""
        wire: dict[str, object] = {}
        if self.replicas != 1:
            wire["replicas"] = self.replicas
        if self.soft_pin:
            wire["soft_pin_s"] = self.soft_pin_s
        if self.hard_pin:
            wire["hard_pin"] = True
        if self.preferred_node is not None:
            wire["preferred_node"] = self.preferred_node
        if self.overwrite:
            wire["overwrite"] = True
        return wire
