"""Exceptions of the store.

The hierarchy::

    StoreError
    ├── ConfigError (ValueError)              bad config field, size string or address
    ├── InvalidKey (ValueError)               empty, too long, or not a str
    ├── InvalidArgument (TypeError)           wrong type or shape of a value or buffer
    ├── NotFound (KeyError)                   no committed object under that key
    ├── AlreadyExists                         put of an existing key without overwrite
    ├── NoSpace                               no room for the object (after eviction)
    ├── ChecksumMismatch                      the bytes read are not the bytes written
    ├── StoreTimeout (TimeoutError)           a request's deadline passed
    ├── ProtocolError                         junk or a truncated frame on the wire
    ├── MasterUnavailable (ConnectionError)   cannot reach the master
    ├── ReplicaUnavailable                    every replica of an object failed to read
    └── BatchFailed                           raised by BatchResult.raise_for_errors()

Every error keeps its inputs as attributes (``.key``, ``.limit`` ...) and pickles, because
errors cross process boundaries: the master sends them to clients as ``to_wire()`` data.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyExists",
    "BatchFailed",
    "ChecksumMismatch",
    "ConfigError",
    "InvalidArgument",
    "InvalidKey",
    "MasterUnavailable",
    "NoSpace",
    "NotFound",
    "ProtocolError",
    "ReplicaUnavailable",
    "StoreError",
    "StoreTimeout",
    "error_from_wire",
]


def _rebuild(cls: type[StoreError], fields: dict[str, Any]) -> StoreError:
    return cls(**fields)


class StoreError(Exception):
    """Base of every error raised by kvstack.store."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.fields: dict[str, Any] = {"message": message, "key": key}

    def _keep(self, text: str, /, **fields: Any) -> None:
        # Subclasses build their message from fields and keep the fields for pickling/the wire.
        Exception.__init__(self, text)
        self.key = fields.get("key")
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.fields))

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def to_wire(self) -> dict[str, Any]:
        """The error as JSON-able data."""
        return {"type": type(self).__name__, "fields": self.fields}


class ConfigError(StoreError, ValueError):
    """A configuration value is invalid."""


class InvalidKey(StoreError, ValueError):
    """A key that can never be stored: empty, too long or not a str."""

    def __init__(self, key: object, *, reason: str) -> None:
        self.reason = reason
        Exception.__init__(self, f"invalid key {key!r}: {reason}")
        self.key = key if isinstance(key, str) else None
        self.fields = {"key": self.key, "reason": reason}


class InvalidArgument(StoreError, TypeError):
    """A value, buffer or option of the wrong type, size or shape."""


class NotFound(StoreError, KeyError):
    """No committed object under that key."""

    def __init__(self, key: str) -> None:
        self._keep(f"key {key!r} not found", key=key)


class AlreadyExists(StoreError):
    """A put of an existing key without ``overwrite=True``."""

    def __init__(self, key: str) -> None:
        self._keep(
            f"key {key!r} already exists (pass overwrite=True to replace it)",
            key=key,
        )


class NoSpace(StoreError):
    """No room for the object on enough distinct nodes, even after eviction."""

    def __init__(
        self, key: str, *, size_bytes: int, replicas: int, detail: str, transient: bool = False
    ) -> None:
        self.size_bytes = size_bytes
        self.replicas = replicas
        # True when room may appear by itself (read leases ending, demotions finishing).
        self.transient = transient
        self._keep(
            f"no space for key {key!r} ({size_bytes} bytes x {replicas} replicas): {detail}",
            key=key,
            size_bytes=size_bytes,
            replicas=replicas,
            detail=detail,
            transient=transient,
        )


class ChecksumMismatch(StoreError):
    """The bytes read back do not match the checksum committed with them."""

    def __init__(self, key: str, *, expected: int, actual: int, replica: str) -> None:
        self.expected = expected
        self.actual = actual
        self.replica = replica
        self._keep(
            f"checksum of key {key!r} from {replica}: expected {expected:#010x}, "
            f"got {actual:#010x}",
            key=key,
            expected=expected,
            actual=actual,
            replica=replica,
        )


class StoreTimeout(StoreError, TimeoutError):
    """A request did not finish within its deadline."""

    def __init__(self, what: str, *, timeout_s: float, key: str | None = None) -> None:
        self.what = what
        self.timeout_s = timeout_s
        self._keep(
            f"{what} did not finish within {timeout_s:g} s", what=what, timeout_s=timeout_s, key=key
        )


class ProtocolError(StoreError):
    """A frame that is not ours: bad magic, unknown op, truncated or oversized payload."""

    def __init__(self, message: str, *, peer: str = "") -> None:
        self.peer = peer
        self._keep(f"{message} (peer {peer})" if peer else message, message=message, peer=peer)

    def __str__(self) -> str:
        return str(self.args[0])


class MasterUnavailable(StoreError, ConnectionError):
    """The master cannot be reached or dropped the connection."""

    def __init__(self, address: str, *, reason: str) -> None:
        self.address = address
        self.reason = reason
        self._keep(f"master at {address} unavailable: {reason}", address=address, reason=reason)


class ReplicaUnavailable(StoreError):
    """Every replica of an object failed to read (node dead, segment gone)."""

    def __init__(self, key: str, *, reasons: list[str]) -> None:
        self.reasons = reasons
        self._keep(
            f"no replica of key {key!r} could be read: " + "; ".join(reasons),
            key=key,
            reasons=reasons,
        )


class BatchFailed(StoreError):
    """One or more items of a batch failed; ``.failures`` maps index -> error."""

    def __init__(self, failures: dict[int, StoreError], *, total: int) -> None:
        self.failures = failures
        self.total = total
        first = ", ".join(f"[{i}] {e}" for i, e in list(failures.items())[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        self._keep(
            f"{len(failures)} of {total} items failed: {first}{more}",
            failures=failures,
            total=total,
        )


_BY_NAME: dict[str, type[StoreError]] = {
    cls.__name__: cls
    for cls in (
        StoreError,
        ConfigError,
        InvalidKey,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        NoSpace,
        ChecksumMismatch,
        StoreTimeout,
        ProtocolError,
        MasterUnavailable,
        ReplicaUnavailable,
    )
}


def error_from_wire(data: object) -> StoreError:
    """Rebuild an error sent by ``to_wire()``; junk becomes a ProtocolError naming it."""
    if isinstance(data, dict):
        cls = _BY_NAME.get(str(data.get("type")))
        fields = data.get("fields")
        if cls is not None and isinstance(fields, dict):
            try:
                return cls(**fields)
            except TypeError:
                pass
    return ProtocolError(f"unreadable error from the master: {data!r}")
