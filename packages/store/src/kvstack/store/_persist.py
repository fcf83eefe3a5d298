"""The master's durable metadata: a write-ahead log of JSON lines plus a periodic snapshot on
local disk (``MetadataLog``), or one Redis hash (``RedisLog``) when several hosts share it.

Each committed change is one line appended with ``os.write`` before the client hears "ok", so
a killed master (kill -9) loses nothing the kernel has seen. On start, ``load()`` reads the
snapshot, replays the log over it, then writes a fresh snapshot and truncates the log. A torn
last line (the process died mid-write) is ignored: its put was never acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import redis

from kvstack.store.errors import StoreError

__all__ = ["MetadataLog", "ObjectLog", "RedisLog"]

logger = logging.getLogger(__name__)

SNAPSHOT = "snapshot.json"
LOG = "wal.jsonl"


class ObjectLog(Protocol):
    """Where the master keeps committed objects' metadata across restarts."""

    records: int  # changes since the last snapshot

    def load(self) -> dict[str, dict[str, Any]]:
        """Entries as of the last acknowledged change (key -> entry record)."""
        ...

    def append(self, record: dict[str, Any]) -> None:
        """Make one change durable before the client is told it happened."""
        ...

    def snapshot(self, entries: dict[str, dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class MetadataLog:
    """Records: ``{"op": "put", "key": ..., "entry": {...}}`` or ``{"op": "del", "key": ...}``."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self.records = 0

    def load(self) -> dict[str, dict[str, Any]]:
        """Entries as of the last acknowledged change (key -> entry record)."""
        entries: dict[str, dict[str, Any]] = {}
        snapshot = self.dir / SNAPSHOT
        if snapshot.exists():
            data = json.loads(snapshot.read_text())
            entries = {str(k): v for k, v in data["entries"].items()}
        log = self.dir / LOG
        replayed = 0
        if log.exists():
            with log.open("rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        logger.warning("ignoring torn record at the end of %s: %r", log, line[:80])
                        break
                    self._apply(entries, record)
                    replayed += 1
        logger.info(
            "metadata loaded from %s: %d objects (%d log records replayed)",
            self.dir,
            len(entries),
            replayed,
        )
        self.snapshot(entries)
        return entries

    @staticmethod
    def _apply(entries: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
        if record.get("op") == "put":
            entries[record["key"]] = record["entry"]
        elif record.get("op") == "del":
            entries.pop(record["key"], None)

    def append(self, record: dict[str, Any]) -> None:
        if self._fd < 0:
            self._fd = os.open(self.dir / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._fd, json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.records += 1

    def snapshot(self, entries: dict[str, dict[str, Any]]) -> None:
        """Write every entry atomically (tmp + rename), then start an empty log."""
        tmp = self.dir / (SNAPSHOT + ".tmp")
        with tmp.open("w") as f:
            json.dump({"version": 1, "entries": entries}, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / SNAPSHOT)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(
            self.dir / LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
        )
        self.records = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RedisLog:
    """Entries in one Redis hash (key -> entry JSON): each change is one HSET or HDEL, so
    there is no log to replay and ``snapshot`` has nothing to do. Raises StoreError naming the
    URL when Redis fails."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.records = 0
        self._hash = "kvstack:store:objects"
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self._redis.hgetall(self._hash)
        except redis.RedisError as exc:
            raise StoreError(f"metadata store {self.url}: {exc}") from exc
        entries = {k.decode(): json.loads(v) for k, v in raw.items()}  # pyrefly: ignore[missing-attribute] -- sync client returns a dict
        logger.info("metadata loaded from %s: %d objects", self.url, len(entries))
        return entries

    def append(self, record: dict[str, Any]) -> None:
        try:
            if record.get("op") == "put":
                self._redis.hset(
                    self._hash, record["key"], json.dumps(record["entry"], separators=(",", ":"))
                )
            elif record.get("op") == "del":
                self._redis.hdel(self._hash, record["key"])
        except redis.RedisError as exc:
            raise StoreError(f"metadata store {self.url}: {exc}", key=record.get("key")) from exc

    def snapshot(self, entries: dict[str, dict[str, Any]]) -> None:
        self.records = 0

    def close(self) -> None:
        self._redis.close()
