"""The distributed KV-cache store: a master that places objects on memory contributed by store
nodes, replicas, leases, eviction and a disk tier; clients move bytes through kvstack.transfer.
"""

from kvstack.store._allocator import AllocatorStats, SegmentAllocator
from kvstack.store._batch import BatchResult, ItemOutcome
from kvstack.store._client import AsyncStoreClient, StoreClient
from kvstack.store._config import ClientConfig, MasterConfig, NodeConfig, PutOptions, parse_size
from kvstack.store._master import Master, run_master_in_thread
from kvstack.store._node import StoreNode
from kvstack.store.errors import (
    AlreadyExists,
    BatchFailed,
    ChecksumMismatch,
    ConfigError,
    InvalidArgument,
    InvalidKey,
    MasterUnavailable,
    NoSpace,
    NotFound,
    ProtocolError,
    ReplicaUnavailable,
    StoreError,
    StoreTimeout,
)

__all__ = [
    "AllocatorStats",
    "AlreadyExists",
    "AsyncStoreClient",
    "BatchFailed",
    "BatchResult",
    "ChecksumMismatch",
    "ClientConfig",
    "ConfigError",
    "InvalidArgument",
    "InvalidKey",
    "ItemOutcome",
    "Master",
    "MasterConfig",
    "MasterUnavailable",
    "NoSpace",
    "NodeConfig",
    "NotFound",
    "ProtocolError",
    "PutOptions",
    "ReplicaUnavailable",
    "SegmentAllocator",
    "StoreClient",
    "StoreError",
    "StoreNode",
    "StoreTimeout",
    "parse_size",
    "run_master_in_thread",
]
