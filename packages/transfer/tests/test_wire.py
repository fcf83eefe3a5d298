"""The tcp server seen from a raw socket: bounds checks on the serving side, tokens, junk."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from kvstack.transfer import AuthenticationFailed, Engine, EngineConfig, OutOfBounds, _native, _tcp
from kvstack.transfer._framing import HEADER, FrameOp, pack
from kvstack.transfer._native import NativeCopier
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


def _writev(
    sock: socket.socket, request_id: int, name: bytes, ranges: list[tuple[int, bytes]]
) -> None:
    table = b"".join(struct.pack("<2Q", offset, len(data)) for offset, data in ranges)
    payload = b"".join(data for _, data in ranges)
    head = pack(FrameOp.WRITEV, request_id, name=name, offset=len(ranges), length=len(payload))
    sock.sendall(head + name + table + payload)


def test_frames_of_a_known_segment_are_served_natively(
    copy_path: str, server: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first frame for a host segment goes through Python; later READ, WRITE, READV and
    # WRITEV frames for it on that connection are served by one native call each. A frame
    # for another segment, or one the native call must not serve, is punted to Python.
    statuses: list[int] = []
    ops: list[int] = []
    serve_frame = NativeCopier.serve_frame

    def spy(self: NativeCopier, *args: Any, **kwargs: Any) -> int:
        statuses.append(serve_frame(self, *args, **kwargs))
        ops.append(int(kwargs["scratch"].out[2]) if statuses[-1] == _native.SERVE_DONE else 0)
        return statuses[-1]

    monkeypatch.setattr(NativeCopier, "serve_frame", spy)
    seg = server.array("seg")
    server.register("ro", b"read-only bytes", readonly=True)
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        for i in range(4):
            _writev(sock, 10 + i, b"seg", [(100 * i, b"ab"), (100 * i + 50, bytes([i]) * 3)])
            assert _reply(sock) == (FrameOp.OK, 10 + i, b"")
        sock.sendall(pack(FrameOp.READ, 20, name=b"seg", offset=300, length=5) + b"seg")
        assert _reply(sock) == (FrameOp.OK, 20, b"ab\x00\x00\x00")
        sock.sendall(pack(FrameOp.WRITE, 21, name=b"seg", offset=900, length=3) + b"seg" + b"xyz")
        assert _reply(sock) == (FrameOp.OK, 21, b"")
        ranges = struct.pack("<4Q", 900, 3, 50, 3)
        sock.sendall(pack(FrameOp.READV, 22, name=b"seg", offset=2, length=6) + b"seg" + ranges)
        assert _reply(sock) == (FrameOp.OK, 22, b"xyz\x00\x00\x00")
        # Another segment: punted the first time, then known (for reads: it is read-only).
        for request_id in (30, 31):
            sock.sendall(pack(FrameOp.READ, request_id, name=b"ro", offset=5, length=4) + b"ro")
            assert _reply(sock) == (FrameOp.OK, request_id, b"only")
        sock.sendall(pack(FrameOp.WRITE, 32, name=b"ro", offset=0, length=2) + b"ro" + b"no")
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "SegmentReadOnly")
        sock.sendall(pack(FrameOp.READ, 33, name=b"ro", offset=0, length=4) + b"ro")
        assert _reply(sock) == (FrameOp.OK, 33, b"read")
    for i in range(4):
        assert bytes(seg[100 * i : 100 * i + 2]) == b"ab"
        assert bytes(seg[100 * i + 50 : 100 * i + 53]) == bytes([i]) * 3
    assert bytes(seg[900:903]) == b"xyz"
    if copy_path == "native":
        # The native call replies before it returns: wait for the one that sees the close.
        deadline = time.monotonic() + TIMEOUT_S
        while _native.SERVE_EOF not in statuses and time.monotonic() < deadline:
            time.sleep(0.01)
        done, punt = _native.SERVE_DONE, _native.SERVE_PUNT
        # WRITEVs 2-4, the READ, WRITE and READV; "ro" punted, then read natively; the
        # WRITE into "ro" punted (Python refuses it); the last READ; then the close.
        assert statuses == [done] * 6 + [punt, done, punt, done, _native.SERVE_EOF]
        assert ops[:6] == [FrameOp.WRITEV] * 3 + [FrameOp.READ, FrameOp.WRITE, FrameOp.READV]
        assert ops[7] == ops[9] == FrameOp.READ
    else:
        assert statuses == []


def test_one_off_tcp_requests_take_the_lane_natively(
    copy_path: str, server: Engine, metadata_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small one-off request goes out and gets its reply in one native call on the thread's
    # lane; once the segment is looked up, without a Batch. A reply other than a plain OK
    # (here an error from the owner) is handed to Python, which raises it by name, and the
    # lane serves the next request.
    statuses: list[int] = []
    lane_call = NativeCopier.lane_call

    def spy(self: NativeCopier, *args: Any, **kwargs: Any) -> int:
        statuses.append(lane_call(self, *args, **kwargs))
        return statuses[-1]

    batches: list[int] = []
    submit = Engine._submit

    def count(self: Engine, *args: Any, **kwargs: Any) -> Any:
        batches.append(1)
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(NativeCopier, "lane_call", spy)
    monkeypatch.setattr(Engine, "_submit", count)
    seg = server.array("seg")
    with Engine(EngineConfig(metadata_url=metadata_url, token="s3cret")) as client:
        local = client.allocate("local", 1000)
        local[:] = np.arange(1000, dtype=np.uint8) * 7
        client.write("local", "seg", 999, local_offset=1, remote_offset=1, transport="tcp")
        assert bytes(seg[1:1000]) == bytes(local[1:1000])
        seg[100:300] = 9
        client.read("local", "seg", 200, local_offset=3, remote_offset=100, transport="tcp")
        assert bytes(local[3:203]) == b"\x09" * 200
        client.write("local", "seg", 0, transport="tcp")
        assert len(batches) == 1  # only the first request looked the segment up
        server.unregister("seg")
        server.register("seg", bytearray(10))  # smaller: the client's record is stale
        with pytest.raises(OutOfBounds, match="'seg'"):
            client.write("local", "seg", 20, transport="tcp")
        client.write("local", "seg", 10, transport="tcp")  # looked up afresh
        assert bytes(server.array("seg")) == bytes(local[:10])
        assert len(batches) == 2
    if copy_path == "native":
        done, punt = _native.LANE_DONE, _native.LANE_PUNT
        assert statuses == [done, done, done, punt, done]
    else:
        assert statuses == []


def test_native_server_refuses_what_python_refuses(copy_path: str, server: Engine) -> None:
    # Once a connection serves frames natively, a bad frame still gets Python's error and
    # changes no byte; a withdrawn segment is never read or written again, not even through
    # the old mapping; a re-registered one is checked against its new size.
    seg = server.array("seg")
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        for request_id in (1, 2):
            _writev(sock, request_id, b"seg", [(0, b"ok")])
            assert _reply(sock)[:2] == (FrameOp.OK, request_id)
        _writev(sock, 3, b"seg", [(0, b"no"), (999, b"no")])  # the second runs past the end
        op, _, payload = _reply(sock)
        assert op is FrameOp.ERROR
        assert json.loads(payload)["type"] == "OutOfBounds"
        # The same for single READs and WRITEs, their payload drained.
        sock.sendall(pack(FrameOp.WRITE, 40, name=b"seg", offset=998, length=3) + b"seg" + b"no!")
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "OutOfBounds")
        sock.sendall(pack(FrameOp.READ, 41, name=b"seg", offset=1001, length=0) + b"seg")
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "OutOfBounds")
        sock.sendall(pack(FrameOp.READ, 42, name=b"seg", offset=0, length=2) + b"seg")
        assert _reply(sock) == (FrameOp.OK, 42, b"ok")
        assert bytes(seg[:2]) == b"ok"
        server.unregister("seg")
        _writev(sock, 4, b"seg", [(0, b"no")])
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "SegmentNotFound")
        sock.sendall(pack(FrameOp.READ, 43, name=b"seg", offset=0, length=2) + b"seg")
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "SegmentNotFound")
        assert bytes(seg[:2]) == b"ok"
        server.register("seg", bytearray(10))
        _writev(sock, 5, b"seg", [(8, b"no!")])
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "OutOfBounds")
        _writev(sock, 6, b"seg", [(7, b"new")])
        assert _reply(sock)[:2] == (FrameOp.OK, 6)
        assert bytes(server.array("seg")[7:10]) == b"new"
        # Ranges that do not add up: a protocol error, and the connection is closed.
        sock.sendall(
            pack(FrameOp.WRITEV, 7, name=b"seg", offset=1, length=3)
            + b"seg" + struct.pack("<2Q", 0, 2) + b"abc"
        )  # fmt: skip
        op, _, payload = _reply(sock)
        assert (op, json.loads(payload)["type"]) == (FrameOp.ERROR, "ProtocolError")
        with contextlib.suppress(ConnectionError):
            assert sock.recv(1) == b""
    assert bytes(seg[:2]) == b"ok"


def test_native_server_survives_a_client_dying_mid_frame(copy_path: str, server: Engine) -> None:
    seg = server.array("seg")
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        _writev(sock, 1, b"seg", [(0, b"one")])
        assert _reply(sock)[:2] == (FrameOp.OK, 1)
        head = pack(FrameOp.WRITEV, 2, name=b"seg", offset=1, length=100)
        sock.sendall(head + b"seg" + struct.pack("<2Q", 0, 100) + b"x" * 40)  # then gone
    with _connect(server.address) as sock:  # the server serves the next client
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        _writev(sock, 1, b"seg", [(500, b"two")])
        assert _reply(sock)[:2] == (FrameOp.OK, 1)
    assert bytes(seg[500:503]) == b"two"


def test_a_client_stalling_mid_writev_is_dropped(
    copy_path: str, server: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half a page sent, then silence with the connection open: the server gives up on it
    # after its stall time (60 s; 0.5 s here), natively served or not, and stays up.
    monkeypatch.setattr(_tcp, "_SERVER_STALL_S", 0.5)
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        _writev(sock, 1, b"seg", [(0, b"one")])  # after this one, natively served
        assert _reply(sock)[:2] == (FrameOp.OK, 1)
        head = pack(FrameOp.WRITEV, 2, name=b"seg", offset=1, length=100)
        sock.sendall(head + b"seg" + struct.pack("<2Q", 0, 100) + b"x" * 40)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            while sock.recv(4096):  # an error frame may come first, then the close
                pass
        assert time.monotonic() - started < TIMEOUT_S
    # (The 40 bytes that came were received straight into the segment: the request failed.)
    with _connect(server.address) as sock:
        assert _hello(sock, b"s3cret")[0] is FrameOp.OK
        _writev(sock, 1, b"seg", [(500, b"two")])
        assert _reply(sock)[:2] == (FrameOp.OK, 1)


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
