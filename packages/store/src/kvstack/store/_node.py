"""A storage node: contributes memory segments (and a disk tier) and runs the master's tasks.

The node polls the master (its heartbeat); replies carry tasks: copy a replica from another
node (re-replication), demote a range to disk, promote it back, drop a disk file. Tasks run on
a worker thread, so a long disk write never delays the heartbeat.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kvstack.store._checksum import checksum, parse_kind
from kvstack.store._config import NodeConfig
from kvstack.store._wire import MasterConnection, Op
from kvstack.store.errors import StoreError
from kvstack.transfer import Engine, EngineConfig, TransferError

__all__ = ["StoreNode"]

logger = logging.getLogger(__name__)

# Segment records expire this long after the node's last refresh: a dead node's segments
# vanish from the metadata service soon, and a restarted master's service is refilled fast.
_SEGMENT_TTL_S = 3.0


class StoreNode:
    """Contributes ``config.memory_bytes`` (shared memory) to the store of ``config.master``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.name = config.name or f"node-{uuid.uuid4().hex[:8]}"
        self.incarnation = uuid.uuid4().hex
        self._master = MasterConnection(config.master)
        self._engine: Engine | None = None
        self._segments: dict[str, np.ndarray] = {}
        self._disk: Path | None = None
        if config.disk_dir is not None:
            self._disk = Path(config.disk_dir) / self.name
            self._disk.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._tasks: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._done: list[dict[str, Any]] = []
        self._done_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> StoreNode:
        try:
            self.start()
        except BaseException:
            self.close()  # the engine's threads would otherwise keep the process alive
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise StoreError(f"node {self.name!r} is not started")
        return self._engine

    def start(self) -> None:
        """Allocate the segments, register with the master, start polling."""
        hello = self._master.call_retrying(Op.HELLO, {}, timeout_s=self.config.request_timeout_s)
        self._engine = Engine(
            EngineConfig(metadata_url=str(hello["metadata_url"]), metadata_ttl_s=_SEGMENT_TTL_S)
        )
        remaining, index = self.config.memory_bytes, 0
        while remaining > 0:
            size = min(remaining, self.config.segment_bytes)
            name = f"kvs-{self.name}-{self.incarnation[:8]}-{index}"
            # Contributed memory is committed now: no page faults under puts later.
            self._segments[name] = self._engine.allocate(name, size, prefault=True)
            remaining -= size
            index += 1
        self._register()
        for target, what in ((self._poll_loop, "poll"), (self._work_loop, "tasks")):
            thread = threading.Thread(target=target, name=f"kvstack-store-{what}-{self.name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def _register(self) -> None:
        disk_files = sorted(os.listdir(self._disk)) if self._disk is not None else []
        self._master.call(
            Op.REGISTER_NODE,
            {
                "name": self.name,
                "incarnation": self.incarnation,
                "segments": [[n, a.nbytes] for n, a in self._segments.items()],
                "disk_bytes": self.config.disk_bytes if self._disk is not None else 0,
                "disk_files": [f for f in disk_files if f.endswith(".bin")],
            },
            timeout_s=self.config.request_timeout_s,
        )
        logger.info("node %r registered with master %s", self.name, self.config.master)

    def _poll(self, *, wait: bool) -> None:
        with self._done_lock:
            done = self._done
            self._done = []
        try:
            reply = self._master.call(
                Op.NODE_POLL,
                {"name": self.name, "incarnation": self.incarnation, "done": done, "wait": wait},
                timeout_s=self.config.request_timeout_s,
            )
        except BaseException:
            with self._done_lock:
                self._done = done + self._done
            raise
        if reply.get("reregister"):
            logger.warning(
                "master %s does not know node %r: registering", self.config.master, self.name
            )
            self._register()
            return
        for task in reply.get("tasks") or []:
            self._tasks.put(task)

    def _poll_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._poll(wait=True)
                failures = 0
            except StoreError as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning(
                        "poll of master %s failed (%d): %s", self.config.master, failures, exc
                    )
                # Back off before reconnecting; the master may be restarting.
                self._stop.wait(min(self.config.poll_interval_s, 0.05 * failures))

    def _work_loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            result = self._run(task)
            if not task.get("id"):
                continue
            with self._done_lock:
                self._done.append(result)
            try:
                self._poll(wait=False)  # deliver the result now, not at the next heartbeat
            except StoreError as exc:
                logger.warning("could not report task %s: %s", task.get("id"), exc)

    def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        kind = task.get("kind")
        result: dict[str, Any] = {"id": task.get("id"), "ok": True}
        try:
            if kind == "copy":
                self.engine.read(
                    str(task["dst_segment"]),
                    str(task["src_segment"]),
                    int(task["length"]),
                    local_offset=int(task["dst_offset"]),
                    remote_offset=int(task["src_offset"]),
                )
                view = self._view(
                    str(task["dst_segment"]), int(task["dst_offset"]), int(task["length"])
                )
                kind = parse_kind(task.get("checksum_kind"), what=f"copy task {task.get('id')}")
                result["checksum"] = checksum(view.data, kind)
            elif kind == "demote":
                view = self._view(str(task["segment"]), int(task["offset"]), int(task["length"]))
                path = self._disk_path(str(task["file"]))
                tmp = path.with_suffix(".tmp")
                with tmp.open("wb") as f:
                    f.write(view.data)
                os.replace(tmp, path)
            elif kind == "promote":
                view = self._view(str(task["segment"]), int(task["offset"]), int(task["length"]))
                with self._disk_path(str(task["file"])).open("rb") as f:
                    got = f.readinto(view.data)
                if got != len(view):
                    raise OSError(f"disk file {task['file']} has {got} bytes, expected {len(view)}")
            elif kind == "drop_disk":
                self._disk_path(str(task["file"])).unlink(missing_ok=True)
            else:
                raise StoreError(f"unknown task kind {kind!r}")
        except (TransferError, StoreError, OSError, KeyError, ValueError) as exc:
            logger.warning("node %r: task %s failed: %s", self.name, task, exc)
            result = {"id": task.get("id"), "ok": False, "error": str(exc)}
        return result

    def _view(self, segment: str, offset: int, length: int) -> np.ndarray:
        array = self._segments.get(segment)
        if array is None or offset + length > array.nbytes:
            raise StoreError(
                f"range {offset}+{length} is not in segment {segment!r} of {self.name!r}"
            )
        return array[offset : offset + length]

    def _disk_path(self, name: str) -> Path:
        if self._disk is None:
            raise StoreError(f"node {self.name!r} has no disk tier")
        if "/" in name or name.startswith("."):
            raise StoreError(f"bad disk file name {name!r}")
        return self._disk / name

    def close(self) -> None:
        """Stop polling and withdraw the segments (their objects' replicas are lost)."""
        self._stop.set()
        self._tasks.put(None)
        for thread in self._threads:
            thread.join(timeout=15.0)
        self._master.close()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
