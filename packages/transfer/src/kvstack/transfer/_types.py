"""Records of the transfer engine: operations, requests, segment descriptors, outcomes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from kvstack.transfer.errors import InvalidRequest, MetadataError, TransferError

__all__ = ["BufferItem", "Op", "RequestStatus", "SegmentInfo", "TransferOutcome", "TransferRequest"]


class Op(StrEnum):
    """READ copies remote -> local; WRITE copies local -> remote."""

    READ = "read"
    WRITE = "write"


class RequestStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """One copy between ``local`` (a segment of this engine) and ``remote`` (any live segment).

    Offsets and length are in bytes; ``timeout_s`` overrides the engine's request deadline.
    """

    op: Op
    local: str
    local_offset: int
    remote: str
    remote_offset: int
    length: int
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            raise InvalidRequest(f"TransferRequest.op must be Op.READ or Op.WRITE, got {self.op!r}")
        for name in ("local_offset", "remote_offset", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"TransferRequest.{name} must be an int >= 0, got {value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidRequest(f"TransferRequest.timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What the metadata service stores for a segment: who owns it and how to reach it."""

    name: str
    size_bytes: int
    owner: str  # engine id, unique per process incarnation
    host_id: str  # same value <=> same kernel (hostname + boot id)
    pid: int
    tcp_address: str  # "host:port" of the owner's tcp server
    device: str = "cpu"  # "cpu" or "cuda:N"
    readonly: bool = False
    shm_name: str | None = None  # file under /dev/shm when the segment is shareable
    cuda_ipc: dict[str, Any] | None = field(default=None)  # CUDA IPC descriptor (see _cuda.py)

    @property
    def peer(self) -> str:
        """How errors and metrics name the owner."""
        return self.tcp_address

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "") -> SegmentInfo:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise MetadataError(f"unreadable segment record {text!r}: {exc}", url=source) from exc


@dataclass(frozen=True, slots=True)
class TransferOutcome:
    """The result of one request of a batch."""

    index: int
    request: TransferRequest
    status: RequestStatus
    error: TransferError | None = None

    @property
    def ok(self) -> bool:
        return self.status is RequestStatus.DONE


# One item of Engine.submit_buffers: (local buffer, remote segment name, remote offset in bytes).
# The buffer is a bytes-like object, numpy array or torch tensor; its whole length moves.
BufferItem = tuple[object, str, int]
