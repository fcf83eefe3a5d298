"""Bad input on the master's socket: clear errors, and the master keeps serving others."""

from __future__ import annotations

import json
import socket

import pytest

from kvstack.store import StoreClient
from kvstack.store._wire import (
    FLAG_ERROR,
    FLAG_REPLY,
    HEADER,
    MAGIC,
    MAX_PAYLOAD_BYTES,
    VERSION,
    Op,
    pack,
)

from .conftest import Cluster


def _connect(cluster: Cluster, transport: str = "tcp") -> socket.socket:
    """A raw connection to the master: TCP, or the same-host Unix socket HELLO names."""
    host, port = cluster.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.settimeout(30)
    if transport == "tcp":
        return sock
    with sock:
        sock.sendall(pack(Op.HELLO, 1, b"{}"))
        _op, _flags, hello = _read_reply(sock)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.settimeout(30)
    unix.connect(str(hello["unix_address"]))
    return unix


def _read_reply(sock: socket.socket) -> tuple[int, int, dict[str, object]]:
    raw = b""
    while len(raw) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(raw))
        if not chunk:
            raise ConnectionError(f"closed after {raw!r}")
        raw += chunk
    _magic, _version, op, flags, _rid, length = HEADER.unpack(raw)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return op, flags, json.loads(body)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _still_serves(client: StoreClient, key: str) -> None:
    client.put(key, b"fine", overwrite=True)
    assert client.get(key) == b"fine"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_garbage_gets_protocol_error_and_close(
    cluster: Cluster, client: StoreClient, transport: str
) -> None:
    with _connect(cluster, transport) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _op, flags, body = _read_reply(sock)
        assert flags == FLAG_REPLY | FLAG_ERROR
        assert body["type"] == "ProtocolError"
        assert "bad magic" in str(body["fields"])
        assert _closed(sock)
    _still_serves(client, "proto/1")


def test_oversized_length_refused(cluster: Cluster, client: StoreClient) -> None:
    with _connect(cluster) as sock:
        sock.sendall(HEADER.pack(MAGIC, VERSION, Op.GET, 0, 1, MAX_PAYLOAD_BYTES + 1))
        _op, _flags, body = _read_reply(sock)
        assert f"exceeds the limit of {MAX_PAYLOAD_BYTES}" in str(body["fields"])
        assert _closed(sock)
    _still_serves(client, "proto/2")


def test_unknown_op_and_bad_payload_keep_the_connection(cluster: Cluster) -> None:
    with _connect(cluster) as sock:
        sock.sendall(pack(99, 7, b"{}"))
        op, flags, body = _read_reply(sock)
        assert (op, flags & FLAG_ERROR) == (99, FLAG_ERROR)
        assert "unknown op 99" in str(body["fields"])
        sock.sendall(pack(Op.GET, 8, b"not json"))
        _op, _flags, body = _read_reply(sock)
        assert "payload is not JSON" in str(body["fields"])
        sock.sendall(pack(Op.GET, 9, b'{"items": "no"}'))
        _op, _flags, body = _read_reply(sock)
        assert body["type"] == "InvalidArgument"
        sock.sendall(pack(Op.GET, 10, json.dumps({"items": [{"key": 5}, 3]}).encode()))
        _op, flags, body = _read_reply(sock)
        assert not flags & FLAG_ERROR  # per-item errors in a good reply
        items = body["items"]
        assert isinstance(items, list)
        assert items[0]["error"]["type"] == "InvalidKey"
        assert items[1]["error"]["type"] == "InvalidArgument"
        bad_options = [
            {"key": "o1", "size": 1, "options": {"replicas": "two"}},
            {"key": "o2", "size": 1, "options": {"replicas": 99}},
            {"key": "o3", "size": -1},
            {"key": "o4", "size": 1, "options": {"preferred_node": 7}},
        ]
        sock.sendall(pack(Op.PUT_START, 12, json.dumps({"items": bad_options}).encode()))
        _op, flags, body = _read_reply(sock)
        assert not flags & FLAG_ERROR
        items = body["items"]
        assert isinstance(items, list)
        assert [i["error"]["type"] for i in items] == ["InvalidArgument"] * 4
        assert "replicas of key 'o2' must be an int in 1..16" in str(items[1])
        sock.sendall(pack(Op.EXISTS, 11, json.dumps({"items": [{"key": "x"}]}).encode()))
        _op, flags, body = _read_reply(sock)
        assert body == {"items": [{"ok": {"exists": False}}]}


@pytest.mark.parametrize(
    "cut", [3, HEADER.size, HEADER.size + 4], ids=["header", "no-body", "body"]
)
def test_truncated_frames_then_hangup(cluster: Cluster, client: StoreClient, cut: int) -> None:
    frame = pack(Op.EXISTS, 1, json.dumps({"items": [{"key": "abc"}]}).encode())
    with _connect(cluster) as sock:
        sock.sendall(frame[:cut])
        sock.shutdown(socket.SHUT_WR)
        assert _closed(sock)  # the half frame is dropped with the connection, never run
    _still_serves(client, f"proto/cut{cut}")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_frames_sent_together_get_one_reply_each(cluster: Cluster, transport: str) -> None:
    """Two requests in one write (the master's one-frame-per-read fast path must not apply)."""
    with _connect(cluster, transport) as sock:
        sock.sendall(pack(Op.HELLO, 7, b"{}") + pack(Op.EXISTS, 8, b'{"items":[{"key":"no"}]}'))
        assert _read_reply(sock)[0] == Op.HELLO
        op, flags, body = _read_reply(sock)
        assert (op, flags) == (Op.EXISTS, FLAG_REPLY)
        assert body == {"items": [{"ok": {"exists": False}}]}


def test_same_host_client_talks_over_the_unix_socket(client: StoreClient) -> None:
    client.put("proto/unix", b"u", overwrite=True)
    assert client.get("proto/unix") == b"u"
    families = {s.sock.family for s in client._master._idle}
    assert families == {socket.AF_UNIX}
