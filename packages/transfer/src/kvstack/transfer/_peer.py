"""A peer process for tests and benchmarks: ``python -m kvstack.transfer._peer --segment ...``.

It registers the segments asked for, prints one JSON line ``{"address", "pid", "segments"}``
on stdout, then answers line commands on stdin until ``quit`` or EOF:

- ``hash NAME OFFSET LENGTH`` -> sha256 hex of those bytes
- ``fill NAME OFFSET LENGTH SEED`` -> fills them with ``random_bytes(SEED, LENGTH)``; "ok"
- ``plain`` -> starts the plain-socket baseline server (see ``plain_server``); prints its port
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstack.transfer._config import EngineConfig, parse_size
from kvstack.transfer._engine import Engine

__all__ = ["PeerProcess", "main", "random_bytes"]

# Plain baseline protocol: op b"W" (client sends LENGTH bytes, server acks one byte) or b"R"
# (server sends LENGTH bytes), each preceded by a 9-byte header (op, u64 length).
PLAIN_HEADER = struct.Struct("<cQ")


def random_bytes(seed: int, length: int) -> np.ndarray:
    """The test pattern: ``length`` bytes from a seeded generator (same on both sides)."""
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    pos = 0
    while pos < len(view):
        n = sock.recv_into(view[pos:])
        if n == 0:
            return False
        pos += n
    return True


def _plain_serve(conn: socket.socket, buffer: memoryview) -> None:
    header = bytearray(PLAIN_HEADER.size)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while _recv_exact(conn, memoryview(header)):
            op, length = PLAIN_HEADER.unpack(header)
            if op == b"W":
                if not _recv_exact(conn, buffer[:length]):
                    return
                conn.sendall(b"k")
            else:
                conn.sendall(buffer[:length])


def plain_server(size_bytes: int) -> int:
    """Start the baseline server (plain sendall/recv_into over loopback); returns its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    buffer = memoryview(bytearray(size_bytes))

    def accept_loop() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_plain_serve, args=(conn, buffer), daemon=True).start()

    threading.Thread(target=accept_loop, name="kvstack-plain-accept", daemon=True).start()
    return int(listener.getsockname()[1])


class PeerProcess:
    """A running ``_peer`` process, driven over its stdin/stdout with deadlines on every read."""

    def __init__(
        self,
        metadata_url: str,
        segments: Sequence[str],
        *,
        token: str | None = None,
        ttl_s: float = 10.0,
        timeout_s: float = 60.0,
    ) -> None:
        argv = [sys.executable, "-m", "kvstack.transfer._peer", "--metadata", metadata_url]
        argv += ["--ttl", str(ttl_s)]
        if token:
            argv += ["--token", token]
        for spec in segments:
            argv += ["--segment", spec]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""
        try:
            self.info: dict[str, Any] = json.loads(self.readline(timeout_s))
        except BaseException:
            self.kill()
            raise
        self.address: str = self.info["address"]
        self.pid: int = self.info["pid"]

    def readline(self, timeout_s: float) -> str:
        """The next stdout line; TimeoutError after timeout_s, EOFError if the peer exited."""
        stdout = self.proc.stdout
        if stdout is None:
            raise EOFError("peer has no stdout")
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer {self.proc.pid} sent no line within {timeout_s} s")
            ready = select.select([stdout], [], [], left)[0]
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError(f"peer {self.proc.pid} exited with {self.proc.wait()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def command(self, line: str, *, timeout_s: float = 60.0) -> str:
        stdin = self.proc.stdin
        if stdin is None:
            raise EOFError("peer has no stdin")
        stdin.write(line.encode() + b"\n")
        stdin.flush()
        return self.readline(timeout_s)

    def freeze(self, timeout_s: float = 60.0) -> None:
        """SIGSTOP the peer and wait until each of its threads has stopped.

        Delivery is asynchronous: a thread on another core could otherwise answer one more
        request after ``os.kill`` returned.
        """
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout_s
        while True:
            states = []
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            if all(state in ("T", "t") for state in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {self.pid} did not stop within {timeout_s} s: {states}")
            time.sleep(0.001)  # polling a kernel state, with a deadline

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the peer gets no chance to clean up (what the failure tests want)."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the peer to exit (EOF on its stdin), kill it if it does not, release the pipes."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # EOF: the peer closes its engine and exits
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _say(value: object) -> None:
    # stdout is this process's reply channel (PeerProcess reads it line by line).
    sys.stdout.write(f"{value}\n")
    sys.stdout.flush()


def _make_segment(engine: Engine, spec: str) -> dict[str, object]:
    # NAME:SIZE[:KIND[:SEED]]  KIND = shm (default) | bytes | readonly | cuda | cudaN
    parts = spec.split(":")
    name, size = parts[0], parse_size(parts[1])
    kind = parts[2] if len(parts) > 2 else "shm"
    seed = int(parts[3]) if len(parts) > 3 else None
    if kind == "shm":
        array = engine.allocate(name, size)
        if seed is not None:
            array[:] = random_bytes(seed, size)
    elif kind in ("bytes", "readonly"):
        data = (
            bytearray(random_bytes(seed, size).tobytes()) if seed is not None else bytearray(size)
        )
        engine.register(name, bytes(data) if kind == "readonly" else data)
    elif kind.startswith("cuda"):  # "cuda" (device 0) or "cudaN" (device N)
        torch = importlib.import_module("torch")
        device = f"cuda:{kind[4:] or 0}"
        tensor = torch.zeros(size, dtype=torch.uint8, device=device)
        if seed is not None:
            tensor.copy_(torch.from_numpy(random_bytes(seed, size)))
        engine.register(name, tensor)
    else:
        raise SystemExit(f"unknown segment kind {kind!r} in {spec!r}")
    return {"name": name, "size_bytes": size, "kind": kind}


def _region_bytes(engine: Engine, name: str, offset: int, length: int) -> np.ndarray:
    segment = engine._local(name)
    region = segment.region(offset, length, op="hash", writing=False)
    if isinstance(region, np.ndarray):
        return region
    return region.cpu().numpy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstack.transfer._peer", description=__doc__)
    parser.add_argument("--metadata", required=True, help="metadata URL")
    parser.add_argument("--token", default=None, help="shared secret for control connections")
    parser.add_argument("--segment", action="append", default=[], help="NAME:SIZE[:KIND[:SEED]]")
    parser.add_argument("--ttl", type=float, default=10.0, help="metadata TTL in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = EngineConfig(metadata_url=args.metadata, token=args.token, metadata_ttl_s=args.ttl)
    with Engine(config) as engine:
        segments = [_make_segment(engine, spec) for spec in args.segment]
        _say(json.dumps({"address": engine.address, "pid": os.getpid(), "segments": segments}))
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "hash":
                name, offset, length = words[1], int(words[2]), int(words[3])
                digest = hashlib.sha256(
                    _region_bytes(engine, name, offset, length).data
                ).hexdigest()
                _say(digest)
            elif words[0] == "fill":
                name, offset, length, seed = words[1], int(words[2]), int(words[3]), int(words[4])
                engine.array(name)[offset : offset + length] = random_bytes(seed, length)
                _say("ok")
            elif words[0] == "plain":
                _say(plain_server(int(words[1])))
            else:
                _say(f"error unknown command {words[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
