"""The embedded metadata server: a small asyncio HTTP/1.1 service over an in-memory table.

REST contract (the client is _metadata.HttpMetadata):
``GET /v1/segments`` (names), ``GET|PUT|DELETE /v1/segments/<name>``, ``GET /healthz``.
PUT takes ``?ttl_s=&replace=`` and answers 409 when another owner holds the name; DELETE takes
``?owner=`` and removes only that owner's entry. Entries expire ttl_s after their last PUT.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable

from kvstack.transfer._metadata import API_PREFIX
from kvstack.transfer._types import SegmentInfo
from kvstack.transfer.errors import MetadataError

__all__ = ["MetadataServer", "serve_in_thread"]

logger = logging.getLogger(__name__)

_MAX_BODY_BYTES = 1 << 20
_IDLE_TIMEOUT_S = 300.0
_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Too Large",
}


class MetadataServer:
    """Serves the segment table on ``host:port`` (port 0 picks one; read ``.port`` after start)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.host = host
        self.port = port
        self._token = token
        self._entries: dict[str, tuple[str, str, float]] = {}  # name -> (json, owner, expires)
        self._server: asyncio.Server | None = None
        # Open connections' handlers, so that close() ends them itself: a handler the loop
        # cancels at exit makes asyncio log "Exception in callback" with a traceback on 3.11.
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metadata server listening on %s:%d", self.host, self.port)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        server = self._server
        if server is None:
            raise MetadataError("metadata server failed to start")
        async with server:
            await server.serve_forever()

    async def close(self) -> None:
        """Stop listening and end every open connection (idle clients keep theirs open)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve_requests(reader, writer)
        except asyncio.CancelledError:
            # close() ended this connection: finish normally, so that asyncio's stream
            # callback finds a result, not a cancellation to log.
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    request_line = await asyncio.wait_for(reader.readline(), _IDLE_TIMEOUT_S)
                except TimeoutError:
                    break
                if not request_line:
                    break
                headers: dict[str, str] = {}
                while True:
                    line = await asyncio.wait_for(reader.readline(), _IDLE_TIMEOUT_S)
                    if line in (b"\r\n", b"\n", b""):
                        break
                    key, _, value = line.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > _MAX_BODY_BYTES:
                    await self._reply(writer, 413, b"body too large")
                    break
                body = await reader.readexactly(length) if length else b""
                status, payload = self._handle(request_line, headers, body)
                await self._reply(writer, status, payload)
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            logger.debug("metadata connection dropped: %s", exc)

    async def _reply(self, writer: asyncio.StreamWriter, status: int, payload: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        # One buffer, never writelines(): on Python 3.12+ an empty chunk in writelines() is never
        # drained and the loop spins on sendmsg forever (cpython gh-155888), which stalled every
        # thread of the process on the GPU runner's 3.12 (a 256-page batch took 3.5 ms, not 0.5).
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()

    def _handle(
        self, request_line: bytes, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        try:
            method, target, _ = request_line.decode("latin-1").split(" ", 2)
        except ValueError:
            return 400, json.dumps({"error": f"bad request line {request_line[:100]!r}"}).encode()
        if self._token is not None:
            given = headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), self._token.encode()):
                return 401, b'{"error":"token refused"}'
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/healthz":
            return 200, b'{"ok":true}'
        now = time.monotonic()
        if url.path == API_PREFIX and method == "GET":
            names = sorted(n for n, (_, _, exp) in self._entries.items() if exp >= now)
            return 200, json.dumps(names).encode()
        if not url.path.startswith(API_PREFIX + "/"):
            return 404, b'{"error":"no such path"}'
        name = urllib.parse.unquote(url.path[len(API_PREFIX) + 1 :])
        entry = self._entries.get(name)
        if entry is not None and entry[2] < now:
            del self._entries[name]
            entry = None
        if method == "GET":
            return (404, b'{"error":"not found"}') if entry is None else (200, entry[0].encode())
        if method == "PUT":
            try:
                info = SegmentInfo.from_json(body)
                ttl_s = float(query.get("ttl_s", "10"))
            except (MetadataError, ValueError) as exc:
                return 400, json.dumps({"error": str(exc)}).encode()
            if info.name != name:
                return 400, json.dumps(
                    {"error": f"body names {info.name!r}, path {name!r}"}
                ).encode()
            if entry is not None and entry[1] != info.owner and query.get("replace") != "1":
                return 409, entry[0].encode()
            if entry is None or entry[1] != info.owner:
                logger.info("segment %r registered by %s", name, info.peer)
            self._entries[name] = (body.decode(), info.owner, now + ttl_s)
            return 204, b""
        if method == "DELETE":
            if entry is not None and entry[1] == query.get("owner"):
                del self._entries[name]
                logger.info("segment %r unregistered", name)
            return 204, b""
        return 405, json.dumps({"error": f"method {method} not allowed"}).encode()


def serve_in_thread(
    *, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> tuple[str, Callable[[], None]]:
    """Run a MetadataServer on its own thread and event loop; returns (url, stop)."""
    loop = asyncio.new_event_loop()
    server = MetadataServer(host=host, port=port, token=token)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        # Connection handlers still parked on keep-alive reads: end them before the loop goes.
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name="kvstack-transfer-metadata", daemon=True)
    thread.start()
    if not started.wait(10.0):
        raise MetadataError("metadata server did not start within 10 s")

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)

    return f"http://{host}:{server.port}", stop
