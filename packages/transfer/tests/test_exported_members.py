import types

import kvstack.transfer


def test_all_is_the_sorted_public_surface() -> None:
    exported = kvstack.transfer.__all__
    assert exported == sorted(exported)
    public = {n for n in dir(kvstack.transfer) if not n.startswith("_")} - {
        "errors",
        "cli",
    }
    # Every public name is exported on purpose (modules excluded), and nothing else is.
    assert set(exported) == {n for n in public if not _is_module(n)}
    assert exported == [
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


def _is_module(name: str) -> bool:
    return isinstance(getattr(kvstack.transfer, name), types.ModuleType)
