"""Every KVSTACK_* environment variable the transfer engine reads, in one place."""

from __future__ import annotations

import os

from kvstack.transfer.errors import ConfigError

# Where segment names are resolved: http://host:port (the embedded server), redis://..., memory://
METADATA_URL_VAR = "KVSTACK_TRANSFER_METADATA_URL"
# Shared secret every control connection (tcp, metadata HTTP) must present.
TOKEN_VAR = "KVSTACK_TRANSFER_TOKEN"  # noqa: S105 -- the variable's name, not a secret
# Address the tcp server binds and advertises.
HOST_VAR = "KVSTACK_TRANSFER_HOST"
# Comma-separated transport names, in order of preference (e.g. "tcp" to force tcp).
TRANSPORTS_VAR = "KVSTACK_TRANSFER_TRANSPORTS"
# Port for the Prometheus exporter; unset means no exporter.
METRICS_PORT_VAR = "KVSTACK_TRANSFER_METRICS_PORT"
# "0" turns the native data path (_copy.c) off: host copies and tcp page frames then take the
# Python path, one ctypes.memmove or memoryview per range. For tests of that path, or to rule
# the native code out when chasing a bug.
NATIVE_COPY_VAR = "KVSTACK_TRANSFER_NATIVE_COPY"
# Most threads one host copy runs on (the caller and its helpers, 1-64); default the usable
# cores, at most 8. More move a big copy faster where memory allows (64 MiB shm write on the
# 16-core H200 machine: 82-96 GB/s on 8, 117-135 on 12-16) but keep more cores busy, polling
# between copies, beside the serving process's own threads.
COPY_THREADS_VAR = "KVSTACK_TRANSFER_COPY_THREADS"
# Where the native library is built and cached; default $XDG_CACHE_HOME/kvstack, else
# ~/.cache/kvstack.
CACHE_DIR_VAR = "KVSTACK_CACHE_DIR"
# The C compiler that builds it; default $CC, else cc, else gcc.
CC_VAR = "CC"

DEFAULT_METADATA_PORT = 7710
DEFAULT_METADATA_URL = f"http://127.0.0.1:{DEFAULT_METADATA_PORT}"


def metadata_url() -> str:
    return os.environ.get(METADATA_URL_VAR) or DEFAULT_METADATA_URL


def token() -> str | None:
    return os.environ.get(TOKEN_VAR) or None


def host() -> str:
    return os.environ.get(HOST_VAR) or "127.0.0.1"


def transports() -> tuple[str, ...] | None:
    raw = os.environ.get(TRANSPORTS_VAR)
    if not raw:
        return None
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def metrics_port() -> int | None:
    raw = os.environ.get(METRICS_PORT_VAR)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{METRICS_PORT_VAR}={raw!r} is not an integer port") from None


def native_copy() -> bool:
    raw = os.environ.get(NATIVE_COPY_VAR, "1").strip().lower()
    if raw in ("1", "true", "yes", "on", ""):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{NATIVE_COPY_VAR}={raw!r} is not one of 1/0, true/false, yes/no, on/off")


def copy_threads(default: int) -> int:
    raw = os.environ.get(COPY_THREADS_VAR, "").strip()
    if not raw:
        return default
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if not 1 <= threads <= 64:
        raise ConfigError(f"{COPY_THREADS_VAR}={raw!r} is not a whole number of threads, 1-64")
    return threads


def cache_dir() -> str:
    explicit = os.environ.get(CACHE_DIR_VAR)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvstack")


def compilers() -> tuple[str, ...]:
    """C compilers to try, in order ($CC alone when set: a user who names one means it)."""
    chosen = os.environ.get(CC_VAR, "").strip()
    return (chosen,) if chosen else ("cc", "gcc")
