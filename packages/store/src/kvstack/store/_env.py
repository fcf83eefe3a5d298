"""Every KVSTACK_STORE_* environment variable the store reads, in one place."""

from __future__ import annotations

import os

from kvstack.store.errors import ConfigError

# host:port of the master that clients and nodes connect to.
MASTER_VAR = "KVSTACK_STORE_MASTER"
# Port of the master's Prometheus exporter; unset means none.
METRICS_PORT_VAR = "KVSTACK_STORE_METRICS_PORT"

DEFAULT_MASTER_PORT = 7720
DEFAULT_MASTER = f"127.0.0.1:{DEFAULT_MASTER_PORT}"


def master() -> str:
    return os.environ.get(MASTER_VAR) or DEFAULT_MASTER


def metrics_port() -> int | None:
    raw = os.environ.get(METRICS_PORT_VAR)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{METRICS_PORT_VAR}={raw!r} is not an integer port") from None
