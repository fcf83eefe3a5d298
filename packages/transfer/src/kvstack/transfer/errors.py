"""Exceptions of the transfer engine.

The hierarchy::

    TransferError
    ├── ConfigError (ValueError)              bad EngineConfig field, size string or URL
    ├── InvalidRequest (ValueError)           a request that can never succeed as written
    │   ├── SegmentNotFound (LookupError)     no live segment of that name
    │   ├── SegmentExists                     a segment of that name is already registered
    │   ├── OutOfBounds (IndexError)          offset + length outside the segment
    │   └── SegmentReadOnly                   WRITE into a read-only segment
    ├── PeerError (ConnectionError)           the peer or the way to it failed
    │   ├── PeerUnavailable                   cannot connect, connection lost, owner dead
    │   ├── AuthenticationFailed              shared-secret token refused
    │   └── ProtocolError                     junk on the wire
    ├── TransferTimeout (TimeoutError)        a request's deadline passed
    ├── TransportUnavailable                  no enabled transport can reach the peer
    ├── MetadataError                         the metadata service failed
    └── BatchFailed                           raised by Batch.raise_for_errors()

Every error keeps its inputs as attributes (``.segment``, ``.offset``, ``.peer`` ...) and
pickles, because errors cross process boundaries (the wire carries them too).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BatchFailed",
    "ConfigError",
    "InvalidRequest",
    "MetadataError",
    "OutOfBounds",
    "PeerError",
    "PeerUnavailable",
    "ProtocolError",
    "SegmentExists",
    "SegmentNotFound",
    "SegmentReadOnly",
    "TransferError",
    "TransferTimeout",
    "TransportUnavailable",
]


def _on(peer: str | None) -> str:
    return f" on peer {peer}" if peer else ""


def _rebuild(cls: type[TransferError], fields: dict[str, Any]) -> TransferError:
    return cls(**fields)


class TransferError(Exception):
    """Base of every error raised by kvstack.transfer."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        self.fields: dict[str, Any] = {"message": message, "peer": peer}

    def _keep(self, text: str, peer: str | None, /, **fields: Any) -> None:
        # Subclasses build their message from fields and keep the fields for pickling/the wire.
        Exception.__init__(self, text)
        self.peer = peer
        self.fields = {**fields, "peer": peer}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.fields))

    def to_wire(self) -> dict[str, Any]:
        """The error as JSON-able data, without the peer (the receiver knows who sent it)."""
        return {"type": type(self).__name__, "fields": {**self.fields, "peer": None}}


class ConfigError(TransferError, ValueError):
    """A configuration value is invalid."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message, peer=peer)


class InvalidRequest(TransferError, ValueError):
    """A request that can never succeed as written."""


class SegmentNotFound(InvalidRequest, LookupError):
    """No live segment of that name."""

    def __init__(self, segment: str, *, peer: str | None = None) -> None:
        self.segment = segment
        self._keep(f"segment {segment!r} not found{_on(peer)}", peer, segment=segment)


class SegmentExists(InvalidRequest):
    """A segment of that name is already registered."""

    def __init__(self, segment: str, *, peer: str | None = None) -> None:
        self.segment = segment
        self._keep(f"segment {segment!r} is already registered{_on(peer)}", peer, segment=segment)


class OutOfBounds(InvalidRequest, IndexError):
    """offset + length falls outside the segment; ``index``: which request of a page batch."""

    def __init__(
        self,
        segment: str,
        *,
        offset: int,
        length: int,
        size_bytes: int,
        op: str = "access",
        peer: str | None = None,
        index: int | None = None,
    ) -> None:
        self.segment = segment
        self.offset = offset
        self.length = length
        self.size_bytes = size_bytes
        self.op = op
        self.index = index
        # index only when given: peers of older versions rebuild wire errors from these fields.
        extra = {} if index is None else {"index": index}
        self._keep(
            f"{'' if index is None else f'request {index}: '}{op} of {length} bytes at offset "
            f"{offset} exceeds segment {segment!r} ({size_bytes} bytes){_on(peer)}",
            peer,
            segment=segment,
            offset=offset,
            length=length,
            size_bytes=size_bytes,
            op=op,
            **extra,
        )


class SegmentReadOnly(InvalidRequest):
    """A WRITE aimed at a segment registered read-only."""

    def __init__(self, segment: str, *, peer: str | None = None) -> None:
        self.segment = segment
        self._keep(f"segment {segment!r} is read-only{_on(peer)}", peer, segment=segment)


class PeerError(TransferError, ConnectionError):
    """The peer, or the way to it, failed."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(f"{message}{_on(peer)}" if peer else message, peer=peer)
        self.fields = {"message": message, "peer": peer}


class PeerUnavailable(PeerError):
    """Cannot connect to the peer, the connection was lost, or its owner process is gone."""


class AuthenticationFailed(PeerError):
    """The peer refused our shared-secret token."""


class ProtocolError(PeerError):
    """Bytes on the wire that are not our protocol."""


class TransferTimeout(TransferError, TimeoutError):
    """A request's deadline passed before it completed.

    ``timeout_s`` 0 means a socket step that carries several requests stopped at the first
    deadline among them (there is no one timeout to name)."""

    def __init__(self, what: str, *, timeout_s: float, peer: str | None = None) -> None:
        self.what = what
        self.timeout_s = timeout_s
        limit = f"within {timeout_s:g} s" if timeout_s > 0 else "before a request's deadline"
        self._keep(
            f"{what} did not complete {limit}{_on(peer)}",
            peer,
            what=what,
            timeout_s=timeout_s,
        )


class TransportUnavailable(TransferError):
    """No enabled transport can reach the segment's owner."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message, peer=peer)


class MetadataError(TransferError):
    """The metadata service failed or returned something unreadable."""

    def __init__(self, message: str, *, url: str = "", peer: str | None = None) -> None:
        self.url = url
        self._keep(
            f"{message} (metadata {url})" if url else message, peer, message=message, url=url
        )


class BatchFailed(TransferError):
    """Some requests of a batch failed; ``.failures`` maps request index to its error."""

    def __init__(
        self, failures: dict[int, TransferError], *, total: int, peer: str | None = None
    ) -> None:
        self.failures = failures
        self.total = total
        first = min(failures) if failures else -1
        detail = f"; first: request {first}: {failures[first]}" if failures else ""
        self._keep(
            f"{len(failures)} of {total} requests failed (indices {sorted(failures)[:16]}){detail}",
            peer,
            failures=failures,
            total=total,
        )


_WIRE_TYPES: dict[str, type[TransferError]] = {
    cls.__name__: cls
    for cls in (
        TransferError,
        InvalidRequest,
        SegmentNotFound,
        SegmentExists,
        OutOfBounds,
        SegmentReadOnly,
        PeerUnavailable,
        AuthenticationFailed,
        ProtocolError,
        TransferTimeout,
    )
}


def error_from_wire(data: object, *, peer: str) -> TransferError:
    """Rebuild an error a peer sent us (``TransferError.to_wire()``), naming the peer."""
    if not isinstance(data, dict):
        return ProtocolError(f"unreadable error payload {data!r}", peer=peer)
    cls = _WIRE_TYPES.get(str(data.get("type")))
    fields = data.get("fields")
    if cls is None or not isinstance(fields, dict):
        return ProtocolError(f"unknown error payload {data!r}", peer=peer)
    try:
        return cls(**{**fields, "peer": peer})
    except TypeError:
        return ProtocolError(f"malformed error payload {data!r}", peer=peer)
