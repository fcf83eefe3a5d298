"""The tcp server seen from a raw socket: bounds checks on the serving side, tokens, junk."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from kvstack.transfer import AuthenticationFailed, Engine, EngineConfig
from kvstack.transfer._framing import HEADER, FrameOp, pack
from kvstack.transfer._peer import PeerProcess

TIMEOUT_S = 30.0


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=TIMEOUT_S)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _reply(sock: socket.socket) -> tuple[FrameOp, int, bytes]:
    magic, _, op, _, request_id, _, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    assert magic == b"KVTE"
    return FrameOp(op), request_id, _recv_exact(sock, length)


def _hello(sock: socket.socket, token: bytes = b"") -> tuple[FrameOp, int, bytes]:
    sock.sendall(pack(FrameOp.HELLO, 1, length=len(token)) + token)
    return _reply(sock)


@pytest.fixture
def server(metadata_url: str) -> Iterator[Engine]:
    with Engine(EngineConfig(metadata_url=metadata_url, token="s3cret")) as engine:
        engine.register("seg", bytearray(1000))
        yield engine


def test_server_refuses_out_of_bounds_even_if_client_skips_checks(server: Engine) -> None:
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        sock.sendall(pack(FrameOp.READ, 7, name=b"seg", offset=990, length=20) + b"seg")
        op, request_id, payload = _reply(sock)
        assert (op, request_id) == (FrameOp.ERROR, 7)
        error = json.loads(payload)
        assert error["type"] == "OutOfBounds"
        assert error["fields"] | {"peer": None} == {
            "segment": "seg", "offset": 990, "length": 20,
            "size_bytes": 1000, "op": "read", "peer": None,
        }  # fmt: skip
        # A refused WRITE's payload is drained: the stream stays usable.
        sock.sendall(pack(FrameOp.WRITE, 8, name=b"seg", offset=999, length=5) + b"seg" + b"xxxxx")
        assert _reply(sock)[:2] == (FrameOp.ERROR, 8)
        sock.sendall(pack(FrameOp.WRITE, 9, name=b"seg", offset=0, length=5) + b"seg" + b"hello")
        assert _reply(sock)[:2] == (FrameOp.OK, 9)
        sock.sendall(pack(FrameOp.READ, 10, name=b"nope", offset=0, length=1) + b"nope")
        op, _, payload = _reply(sock)
        assert op is FrameOp.ERROR
        assert json.loads(payload)["type"] == "SegmentNotFound"
    assert bytes(server.array("seg")[:5]) == b"hello"


def test_vectored_frames_are_bounds_checked_as_a_whole(copy_path: str, server: Engine) -> None:
    ranges = struct.pack("<4Q", 0, 4, 998, 4)  # the second range runs past the end
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        head = pack(FrameOp.WRITEV, 3, name=b"seg", offset=2, length=8)
        sock.sendall(head + b"seg" + ranges + b"abcdefgh")
        op, _, payload = _reply(sock)
        assert op is FrameOp.ERROR
        error = json.loads(payload)
        assert error["type"] == "OutOfBounds"
        assert (error["fields"]["offset"], error["fields"]["length"]) == (998, 4)
        ranges = struct.pack("<4Q", 0, 4, 996, 4)
        head = pack(FrameOp.WRITEV, 4, name=b"seg", offset=2, length=8)
        sock.sendall(head + b"seg" + ranges + b"abcdefgh")
        assert _reply(sock)[:2] == (FrameOp.OK, 4)
        sock.sendall(pack(FrameOp.READV, 5, name=b"seg", offset=2, length=8) + b"seg" + ranges)
        assert _reply(sock) == (FrameOp.OK, 5, b"abcdefgh")
        # Ranges that do not add up to the frame's length are junk.
        sock.sendall(pack(FrameOp.READV, 6, name=b"seg", offset=2, length=9) + b"seg" + ranges)
        op, _, payload = _reply(sock)
        assert op is FrameOp.ERROR
        assert json.loads(payload)["type"] == "ProtocolError"


def test_wrong_token_is_refused(server: Engine) -> None:
    with _connect(server.address) as sock:
        op, _, payload = _hello(sock, b"guess")
        assert op is FrameOp.ERROR
        assert json.loads(payload)["type"] == "AuthenticationFailed"


@pytest.mark.parametrize(
    "junk",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"." * 40, b"\x00" * HEADER.size],
    ids=["http", "zeros"],
)
def test_junk_gets_a_protocol_error_and_a_closed_connection(server: Engine, junk: bytes) -> None:
    with _connect(server.address) as sock:
        sock.sendall(junk)
        op, _, payload = _reply(sock)
        assert op is FrameOp.ERROR
        assert json.loads(payload)["type"] == "ProtocolError"
        # Closed, or reset when the server closed with our junk still unread.
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""


def test_engine_with_wrong_token_gets_authentication_failed(
    metadata_url: str, start_peer: Callable[..., PeerProcess]
) -> None:
    start_peer("guarded:4096:bytes", token="right")
    config = EngineConfig(metadata_url=metadata_url, token="wrong", transports=("tcp",))
    with Engine(config) as engine:
        engine.allocate("local", 4096)
        with pytest.raises(AuthenticationFailed, match="token refused"):
            engine.read("local", "guarded", 4096)
    with Engine(EngineConfig(metadata_url=metadata_url, token="right")) as engine:
        engine.allocate("local", 4096)
        engine.read("local", "guarded", 4096)
