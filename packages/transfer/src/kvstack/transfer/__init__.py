"""The transfer engine: registered memory segments, batched zero-copy reads and writes between
processes and hosts (shared memory, TCP, CUDA), and the metadata service that names segments.

    engine = Engine(EngineConfig(metadata_url="http://127.0.0.1:7710"))  # or redis://, memory://
    kv = engine.allocate("kv0", "64MiB")          # shareable (shm) segment, a uint8 array
    engine.register("weights", tensor)            # bytes-like, numpy, CPU or CUDA torch tensor
    batch = engine.submit([TransferRequest(Op.WRITE, "kv0", 0, "peer-kv", 4096, 16384), ...])
    batch.wait(); batch.raise_for_errors()        # or poll(), statuses(), add_done_callback()
    engine.read("kv0", "peer-kv", 4096)           # one-off helpers raise the request's error
    engine.write_tensor(tensor, "peer-kv")        # tensor helpers
    engine.transfer_buffers(Op.READ, [(out, "peer-kv", 0), ...])  # one batch, caller memory
    engine.transfer_pages(                        # a KV handoff as arrays, no object per page
        Op.WRITE, "kv0", "peer-kv", local_offsets=lo, remote_offsets=ro, lengths=16384
    )

``AsyncEngine`` offers the same API for asyncio. The transport per peer is the fastest that
can reach it (``local`` same process, ``cuda`` CUDA IPC, ``shm`` same host, ``tcp``), or the
one named by ``transport=``. Errors live in ``kvstack.transfer.errors``; configuration in
``EngineConfig`` and the KVSTACK_TRANSFER_* variables (``_env.py``). Command line:
``kvstack-transfer metadata`` and ``kvstack-transfer bench``.
"""

from kvstack.transfer._async import AsyncEngine
from kvstack.transfer._batch import Batch
from kvstack.transfer._config import EngineConfig, format_size, parse_size
from kvstack.transfer._engine import Engine
from kvstack.transfer._kvhash import (
    bytes_hashed,
    copy_host_hashed,
    copy_host_many_hashed,
    kvhash64,
    kvhash64_many,
    native_hashing,
)
from kvstack.transfer._memory import copy_host, copy_host_many
from kvstack.transfer._metadata import MetadataBackend, open_metadata
from kvstack.transfer._metadata_server import MetadataServer
from kvstack.transfer._transport import Transport
from kvstack.transfer._types import (
    BufferItem,
    Op,
    RequestStatus,
    SegmentInfo,
    TransferOutcome,
    TransferRequest,
)
from kvstack.transfer.errors import (
    AuthenticationFailed,
    BatchFailed,
    ConfigError,
    InvalidRequest,
    MetadataError,
    OutOfBounds,
    PeerError,
    PeerUnavailable,
    ProtocolError,
    SegmentExists,
    SegmentNotFound,
    SegmentReadOnly,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
)

__all__ = [
    "AsyncEngine",
    "AuthenticationFailed",
    "Batch",
    "BatchFailed",
    "BufferItem",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "InvalidRequest",
    "MetadataBackend",
    "MetadataError",
    "MetadataServer",
    "Op",
    "OutOfBounds",
    "PeerError",
    "PeerUnavailable",
    "ProtocolError",
    "RequestStatus",
    "SegmentExists",
    "SegmentInfo",
    "SegmentNotFound",
    "SegmentReadOnly",
    "TransferError",
    "TransferOutcome",
    "TransferRequest",
    "TransferTimeout",
    "Transport",
    "TransportUnavailable",
    "bytes_hashed",
    "copy_host",
    "copy_host_hashed",
    "copy_host_many",
    "copy_host_many_hashed",
    "format_size",
    "kvhash64",
    "kvhash64_many",
    "native_hashing",
    "open_metadata",
    "parse_size",
]
