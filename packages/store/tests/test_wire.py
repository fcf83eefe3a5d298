"""The master's frame codec: orjson for the common case, the json module for what orjson refuses."""

from __future__ import annotations

import socket
import threading

import pytest

from kvstack.store import ProtocolError, StoreClient
from kvstack.store._wire import FLAG_REPLY, MasterConnection, Op, decode, encode, pack


@pytest.mark.parametrize(
    "frame",
    [
        {"items": [{"key": "k1", "size": 4096, "options": {"replicas": 2, "soft_pin_s": 1.5}}]},
        {"items": [{"ok": {"put_id": "ab-1", "replicas": [["n", "seg", 0, "memory"]]}}]},
        {"items": [{"put_id": "ab-1", "checksum": 2**64 - 1}]},  # an XXH3-64 digest
        {"key": "caf\u00e9 \u4e2d\u6587", "attrs": {"dtype": "float16", "shape": [2, 3]}},
        # What orjson refuses, through the json module: a lone surrogate (a valid str key) and
        # an integer past 64 bits.
        {"items": [{"key": "half \ud800 pair"}]},
        {"big": 2**70},
        {},
    ],
    ids=["put-start", "reply", "u64", "unicode", "surrogate", "bigint", "empty"],
)
def test_frames_round_trip(frame: dict[str, object]) -> None:
    assert decode(encode(frame), peer="test") == frame


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe junk", "payload is not JSON"),
        (b'{"items": [1, 2', "payload is not JSON"),
        (b"[1, 2, 3]", "payload is not a JSON object"),
    ],
)
def test_junk_is_a_protocol_error(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(payload, peer="127.0.0.1:1")


def test_surrogate_key_through_the_master() -> None:
    key = "page-\udcff-7"  # e.g. a file name decoded with surrogateescape
    with StoreClient.embedded("8MiB") as client:
        client.put(key, b"abc" * 100)
        assert client.exists(key)
        assert client.get(key) == b"abc" * 100


def _answering(replies: list[tuple[int, int]]) -> tuple[socket.socket, threading.Thread]:
    """A one-connection server that reads a request, then sends ``replies`` as (op, id)
    frames with empty payloads."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for op, request_id in replies:
                conn.sendall(pack(op, request_id, b"{}", flags=FLAG_REPLY))
            conn.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_a_reply_to_no_request_sent_is_a_protocol_error() -> None:
    server, thread = _answering([(int(Op.EXISTS), 7)])
    with server:
        master = MasterConnection(f"127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(ProtocolError, match=r"reply \(op 14, id 7\) does not match request"):
            master.call(Op.EXISTS, {"items": []}, timeout_s=5)
        master.close()
    thread.join(5)


def test_owed_replies_reach_their_callback_in_any_order() -> None:
    # The request sent ahead (id 2) is answered first, then the call's own (id 1).
    server, thread = _answering([(int(Op.PUT_START), 2), (int(Op.EXISTS), 1)])
    got: list[object] = []
    with server:
        master = MasterConnection(f"127.0.0.1:{server.getsockname()[1]}")
        reply = master.call(
            Op.EXISTS, {"items": []}, timeout_s=5, ahead=(Op.PUT_START, {}, got.append)
        )
        assert reply == {}
        assert got == [{}]  # read before the call's own reply
        master.close()
    thread.join(5)
