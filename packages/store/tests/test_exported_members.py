import types

import kvstack.store


def test_all_is_the_sorted_public_surface() -> None:
    exported = kvstack.store.__all__
    assert exported == sorted(exported)
    public = {
        n
        for n in dir(kvstack.store)
        if not n.startswith("_") and not isinstance(getattr(kvstack.store, n), types.ModuleType)
    }
    assert set(exported) == public
    assert exported == [
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
