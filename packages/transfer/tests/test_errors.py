import pickle

import pytest

from kvstack.transfer import errors
from kvstack.transfer.errors import (
    BatchFailed,
    MetadataError,
    OutOfBounds,
    PeerUnavailable,
    SegmentNotFound,
    TransferError,
    TransferTimeout,
    error_from_wire,
)

SAMPLES: list[TransferError] = [
    TransferError("plain"),
    SegmentNotFound("kv0", peer="10.0.0.2:7001"),
    OutOfBounds(
        "kv0", offset=1048000, length=4096, size_bytes=1048576, op="read", peer="10.0.0.2:7001"
    ),
    OutOfBounds("kv0", offset=16, length=4096, size_bytes=4096, op="write", index=17),
    PeerUnavailable("connection refused", peer="10.0.0.2:7001"),
    TransferTimeout("write of 4096 bytes", timeout_s=2.0, peer="10.0.0.2:7001"),
    MetadataError("GET 'kv0' failed", url="http://127.0.0.1:7710"),
    BatchFailed({3: SegmentNotFound("x")}, total=8),
]


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_message_and_fields(error: TransferError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert repr(copy.fields) == repr(error.fields)  # nested errors compare by identity


def test_out_of_bounds_names_segment_offset_length_and_peer() -> None:
    error = OutOfBounds(
        "kv0", offset=1048000, length=4096, size_bytes=1048576, op="read", peer="10.0.0.2:7001"
    )
    assert str(error) == (
        "read of 4096 bytes at offset 1048000 exceeds segment 'kv0' (1048576 bytes) "
        "on peer 10.0.0.2:7001"
    )
    assert (error.segment, error.offset, error.length) == ("kv0", 1048000, 4096)
    assert isinstance(error, IndexError)


def test_out_of_bounds_of_a_page_batch_names_the_request() -> None:
    error = OutOfBounds("kv0", offset=16, length=4096, size_bytes=4096, op="write", index=17)
    assert (
        str(error)
        == "request 17: write of 4096 bytes at offset 16 exceeds segment 'kv0' (4096 bytes)"
    )
    assert error.index == 17
    # Without an index the wire fields stay as peers of older versions expect them.
    assert "index" not in OutOfBounds("kv0", offset=0, length=1, size_bytes=0).to_wire()["fields"]
    got = error_from_wire(error.to_wire(), peer="127.0.0.1:9")
    assert isinstance(got, OutOfBounds)
    assert got.index == 17


def test_builtin_bases() -> None:
    assert isinstance(TransferTimeout("x", timeout_s=1.0), TimeoutError)
    # A socket step carrying several requests names no one timeout.
    assert str(TransferTimeout("sending", timeout_s=0.0, peer="p:1")) == (
        "sending did not complete before a request's deadline on peer p:1"
    )
    assert isinstance(PeerUnavailable("x"), ConnectionError)
    assert isinstance(SegmentNotFound("x"), LookupError)


def test_wire_round_trip_adds_the_peer() -> None:
    sent = OutOfBounds("kv0", offset=10, length=20, size_bytes=16, op="write")
    got = error_from_wire(sent.to_wire(), peer="127.0.0.1:9")
    assert isinstance(got, OutOfBounds)
    assert got.peer == "127.0.0.1:9"
    assert str(got).endswith("on peer 127.0.0.1:9")


@pytest.mark.parametrize(
    "junk", [None, 3, {"type": "Nope", "fields": {}}, {"type": "OutOfBounds", "fields": {"x": 1}}]
)
def test_wire_junk_becomes_protocol_error(junk: object) -> None:
    assert isinstance(error_from_wire(junk, peer="p"), errors.ProtocolError)
