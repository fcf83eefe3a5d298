"""Errors name the key and the limit, keep their fields, pickle and cross the wire."""

from __future__ import annotations

import pickle

import pytest

from kvstack.store import (
    AlreadyExists,
    ChecksumMismatch,
    InvalidKey,
    NoSpace,
    NotFound,
    ProtocolError,
    StoreError,
    StoreTimeout,
)
from kvstack.store.errors import error_from_wire

ERRORS: list[StoreError] = [
    NotFound("k1"),
    AlreadyExists("k2"),
    NoSpace("k3", size_bytes=4096, replicas=2, detail="no free block"),
    InvalidKey("x" * 10, reason="1025 bytes exceeds the limit of 1024 bytes"),
    ChecksumMismatch("k4", expected=1, actual=2, replica="n0"),
    StoreTimeout("get of key 'k5'", timeout_s=1.5, key="k5"),
    ProtocolError("bad magic", peer="127.0.0.1:1"),
    StoreError("plain", key="k6"),
]


@pytest.mark.parametrize("error", ERRORS, ids=[type(e).__name__ for e in ERRORS])
def test_errors_pickle_and_cross_the_wire(error: StoreError) -> None:
    for copy in (pickle.loads(pickle.dumps(error)), error_from_wire(error.to_wire())):
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.key == error.key


def test_messages_name_key_and_limit() -> None:
    assert "'k3'" in str(ERRORS[2])
    assert "4096 bytes x 2 replicas" in str(ERRORS[2])
    assert "1024 bytes" in str(ERRORS[3])
    assert isinstance(NotFound("k"), KeyError)
    assert isinstance(StoreTimeout("x", timeout_s=1), TimeoutError)
    assert isinstance(InvalidKey(1, reason="r"), ValueError)


def test_junk_from_the_wire_is_a_protocol_error() -> None:
    assert isinstance(error_from_wire({"type": "NoSuch", "fields": {}}), ProtocolError)
    assert isinstance(error_from_wire("junk"), ProtocolError)
