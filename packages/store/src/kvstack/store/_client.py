"""StoreClient (sync, the data-plane implementation) and AsyncStoreClient (its own executor).

A put is three steps: PUT_START (the master allocates replicas), the client writes the bytes
straight into each replica's node segment through the transfer engine, PUT_COMMIT with their
XXH3-64 (the object becomes visible). A get asks the master for the replicas (which grants a
read lease), reads one, verifies the checksum, and fails over to the next replica on error.
Batches move as one transfer-engine batch over the caller's buffers (``submit_buffers``):
every replica of every put, every first replica of a get; only failed items go one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from kvstack.store._batch import BatchResult, ItemOutcome
from kvstack.store._buffers import byte_view, check_matches, empty_tensor, tensor_attrs
from kvstack.store._checksum import (
    DEFAULT_KIND,
    ChecksumKind,
    checksum,
    parse_kind,
    writer_kind,
)
from kvstack.store._config import ClientConfig, MasterConfig, NodeConfig, PutOptions, parse_size
from kvstack.store._master import check_key, run_master_in_thread
from kvstack.store._node import StoreNode
from kvstack.store._wire import MasterConnection, Op
from kvstack.store.errors import (
    AlreadyExists,
    ChecksumMismatch,
    InvalidArgument,
    InvalidKey,
    NotFound,
    ReplicaUnavailable,
    StoreError,
    StoreTimeout,
    error_from_wire,
)
from kvstack.transfer import (
    BatchFailed,
    BufferItem,
    Engine,
    EngineConfig,
    SegmentNotFound,
    TransferError,
    bytes_hashed,
    copy_host,
    copy_host_hashed,
    copy_host_many,
    copy_host_many_hashed,
    kvhash64_many,
)
from kvstack.transfer import Op as TransferOp

__all__ = ["AsyncStoreClient", "StoreClient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Batches moving more than this use the client's threads: XXH3-64 checksums in parallel and
# the item-by-item fail-over path. (KVH-64 is shared by the native copier's own threads.)
_PARALLEL_BYTES = 4 << 20
# The client's pool: one thread per core, 4 to 8.
_TRANSFER_THREADS = max(4, min(8, os.cpu_count() or 1))
# A same-host put of at least this many bytes computes its KVH-64 inside the copy into the
# node's segment (one pass over the value); a smaller one hashes while PUT_START is in flight,
# where it costs nothing. Same-host gets of this size copy and hash in one pass too.
_FUSED_HASH_BYTES = 64 << 10
# How long a write retries a segment the metadata service does not know (yet): a node
# re-publishes its segments every second (the store's 3 s segment TTL / 3).
_SEGMENT_RETRY_S = 1.5
# Objects up to this size on the same host are copied through Engine.map_segment; bigger ones
# go through a transfer batch, which splits large copies over the engine's copy threads. Was
# 256 KiB; on the 2-core box the direct copy measured faster at 1 and 4 MiB (1 MiB get 7.1 vs
# 3.6 GB/s: one memcpy into the returned bytes instead of the engine's copy plus ``bytes()``;
# 1 MiB put p50 259 vs 345 us) and about even at 16 MiB, where more copy threads on a
# bigger machine should favour the engine.
DIRECT_MAX_BYTES = 4 << 20

# Puts started ahead (see _Slot): a client keeps this many of a repeating size, held or on
# their way, each used within _SLOT_MAX_AGE_S of the master starting it (well inside the 2 s
# after which the master frees it; and short enough that a master restart meanwhile, which
# also forgets started puts, cannot plausibly have handed the space to another put before
# it is written). Unused ones are dropped: the master frees them.
#
# Two, not one: a commit sends the PUT_START of a later put behind it in the same write, and
# the master answers the commit before it runs that start (issue 4: the start was ~40% of
# the master's 22-30 us of Python for a commit with its next start on an H100 host, in every
# put's round trip). That reply is read during the next commit's round trip, so the next put
# must already hold the one before.
_SLOTS_AHEAD = 2
_SLOT_MAX_AGE_S = 0.5
_MAX_SLOTS = 4  # of all sizes, held or coming

Value = object  # bytes-like, numpy array or CPU torch tensor
_DEFAULT_OPTIONS = PutOptions()
_OVERWRITE_OPTIONS = PutOptions(overwrite=True)  # dataclasses.replace costs ~4 us a put


@dataclass(frozen=True, slots=True)
class _Located:
    key: str
    size: int
    checksum: int
    attrs: dict[str, Any]
    replicas: list[tuple[str, str, int]]  # (node, segment, offset)
    checksum_kind: ChecksumKind = DEFAULT_KIND
    lease: int = 0  # the read lease's id, released once this client stops reading (0: none)

    def verifies(self, data: memoryview | bytes) -> bool:
        """Whether ``data`` (the object's bytes) matches the committed checksum."""
        return checksum(data, self.checksum_kind) == self.checksum


@dataclass(frozen=True, slots=True)
class _Slot:
    """A put the master started ahead, with no key yet: space for this client's next put of
    ``size`` bytes (default options). Using it makes a put one round trip, the commit (which
    names the key, with a later put's start behind it), instead of PUT_START and then
    PUT_COMMIT."""

    size: int
    put_id: str
    replicas: list[list[Any]]
    use_by: float  # monotonic


def _checksum_of(kind: ChecksumKind, view: np.ndarray) -> int:
    return checksum(view.data, kind)


class StoreClient:
    """Put and get objects of a store; thread-safe. Close it (or use ``with``) when done."""

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self._master = MasterConnection(self.config.master, spin_s=self.config.reply_spin_s)
        self._stops: list[Callable[[], None]] = []
        self._node: StoreNode | None = None
        hello = self._master.call_retrying(Op.HELLO, {}, timeout_s=self.config.timeout_s)
        self.metadata_url = str(hello["metadata_url"])
        if hello.get("unix_address"):
            self._master.use_unix(str(hello["unix_address"]))
        self._engine = Engine(EngineConfig(metadata_url=self.metadata_url))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._slots_lock = threading.Lock()
        # Starts sent ahead whose reply is not read yet: id -> (when sent, size). A reply lost
        # with its connection is forgotten after _SLOT_MAX_AGE_S.
        self._slots_coming: dict[int, tuple[float, int]] = {}
        self._start_ids = itertools.count(1)
        self._last_size = 0  # of the last put that could use a slot: sizes that repeat get one
        if self.config.contribute_bytes:
            self._node = StoreNode(
                NodeConfig(
                    master=self.config.master,
                    memory_bytes=self.config.contribute_bytes,
                    disk_dir=self.config.contribute_disk_dir,
                )
            )
            try:
                self._node.start()
            except BaseException:
                self.close()
                raise

    @classmethod
    def embedded(
        cls,
        memory: int | str = "256MiB",
        *,
        disk_dir: str | None = None,
        master_config: MasterConfig | None = None,
    ) -> StoreClient:
        """A whole store in this process: master, the memory this client contributes, client.

        Needs no external service (the segment metadata stays in-process).
        """
        base = master_config or MasterConfig()
        config = replace(base, port=0, metadata_url=f"memory://kvstack-store-{uuid.uuid4().hex}")
        master, stop = run_master_in_thread(config)
        try:
            client = cls(
                ClientConfig(
                    master=master.address,
                    contribute_bytes=parse_size(memory, name="memory"),
                    contribute_disk_dir=disk_dir,
                )
            )
        except BaseException:
            stop()
            raise
        client._stops.append(stop)
        return client

    @property
    def local_node(self) -> str | None:
        """The name of the node this client contributes (for ``PutOptions.preferred_node``)."""
        return self._node.name if self._node is not None else None

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release connections, the contributed memory and (embedded) the master. Idempotent."""
        if self._slots_coming:
            self._master.settle(min(self.config.timeout_s, 1.0))  # to give those back too
        with self._slots_lock:
            slots = self._slots
            self._slots = []
        self._abort_slots(slots)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._node is not None:
            self._node.close()
            self._node = None
        if getattr(self, "_engine", None) is not None:
            self._engine.close()
        self._master.close()
        for stop in self._stops:
            stop()
        self._stops.clear()

    # -- single-object API ---------------------------------------------------------------

    def put(
        self,
        key: str,
        data: Value,
        *,
        overwrite: bool = False,
        options: PutOptions | None = None,
    ) -> None:
        """Store ``data`` under ``key``; visible to readers only once complete.

        Raises AlreadyExists (unless ``overwrite``), InvalidKey, NoSpace, StoreTimeout.
        """
        key = check_key(key)
        opts = options or (_OVERWRITE_OPTIONS if overwrite else _DEFAULT_OPTIONS)
        if overwrite and not opts.overwrite:
            opts = replace(opts, overwrite=True)
        self._put_one(key, byte_view(data, what=f"value of key {key!r}"), opts, None)

    def put_from(
        self, key: str, buffer: Value, *, overwrite: bool = False, options: PutOptions | None = None
    ) -> None:
        """Zero-copy put: the bytes go from ``buffer`` straight to the nodes."""
        self.put(key, buffer, overwrite=overwrite, options=options)

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; raises NotFound (never returns b"" for a missing key)."""
        # The common case in one round trip and no batch bookkeeping; fail-over retries and
        # errors other than the item's own take the general path.
        check_key(key)
        deadline = time.monotonic() + self.config.timeout_s
        reply = self._master.call_retrying(
            Op.GET, {"items": [{"key": key}]}, timeout_s=self.config.timeout_s
        )
        item = reply["items"][0]
        if "error" in item:
            error = error_from_wire(item["error"])
            if not isinstance(error, ReplicaUnavailable):
                raise error
        else:
            loc = self._located(key, item["ok"])
            try:
                data = self._read_direct(loc)
                if data is not None:
                    return data
                buf = bytearray(loc.size)
                with contextlib.suppress(ReplicaUnavailable):
                    self._read(loc, np.frombuffer(buf, dtype=np.uint8), deadline)
                    return bytes(buf)
            finally:
                self._release([loc])
        return self.get_batch([key])[0].unwrap()

    def get_into(self, key: str, buffer: Value) -> int:
        """Read ``key`` into the start of writable ``buffer`` (no copy); returns its size."""
        return self.get_into_batch([key], [buffer])[0].unwrap()

    def exists(self, key: str) -> bool:
        return self.exists_batch([key])[0].unwrap()

    def remove(self, key: str) -> None:
        """Remove ``key``; raises NotFound. Bytes under a reader's lease are freed when it ends."""
        self.remove_batch([key])[0].unwrap()

    # -- batch API -----------------------------------------------------------------------

    def put_batch(
        self,
        items: Mapping[str, Value] | Iterable[tuple[str, Value]],
        *,
        overwrite: bool = False,
        options: PutOptions | None = None,
        attrs: Sequence[dict[str, Any] | None] | None = None,
    ) -> BatchResult[None]:
        """Put every (key, value); one outcome per item, in order."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        opts = options or PutOptions()
        if overwrite and not opts.overwrite:
            opts = replace(opts, overwrite=True)
        wire = opts.to_wire()
        deadline = time.monotonic() + self.config.timeout_s
        errors: list[StoreError | None] = [None] * len(pairs)
        views: list[np.ndarray | None] = [None] * len(pairs)
        requests: list[dict[str, Any]] = []
        started: list[int] = []
        for i, pair in enumerate(pairs):
            try:
                if not isinstance(pair, tuple) or len(pair) != 2:
                    raise InvalidArgument(f"item {i} must be a (key, value) pair")
                key = check_key(pair[0])
                view = byte_view(pair[1], what=f"value of key {key!r}")
                views[i] = view
                request: dict[str, Any] = {"key": key, "size": view.nbytes}
                if wire:
                    request["options"] = wire
                if attrs is not None and attrs[i]:
                    request["attrs"] = attrs[i]
                requests.append(request)
                started.append(i)
            except StoreError as exc:
                errors[i] = exc
        if requests:
            reply = self._master.call(
                Op.PUT_START, {"items": requests}, timeout_s=self._left(deadline, "put")
            )
            commits: list[dict[str, Any]] = []
            committed: list[int] = []
            aborts: list[dict[str, Any]] = []
            granted: list[tuple[int, np.ndarray, dict[str, Any]]] = []
            for i, item in zip(started, reply["items"], strict=True):
                if "error" in item:
                    errors[i] = error_from_wire(item["error"])
                    continue
                view = views[i]
                if view is None:
                    raise StoreError("internal: a started put lost its value")
                granted.append((i, view, item["ok"]))
            # Same-host replicas get their KVH-64 inside the copy; the rest are hashed after
            # the writes (overlapping them on the pool measured no gain on the 2-core box).
            kind = writer_kind()
            digests: list[int | None] = [None] * len(granted)
            written = self._write_all(
                [(str(pairs[i][0]), view, ok["replicas"]) for i, view, ok in granted],
                deadline,
                digests=digests if kind is ChecksumKind.KVH_64 else None,
            )
            checksums = self._checksums([view for _, view, _ in granted], kind, digests)
            for (i, _view, ok), outcome, checksum in zip(granted, written, checksums, strict=True):
                if isinstance(outcome, StoreError):
                    errors[i] = outcome
                    aborts.append({"put_id": ok["put_id"]})
                    continue
                commit: dict[str, Any] = {
                    "put_id": ok["put_id"],
                    "checksum": checksum,
                    "checksum_kind": str(kind),
                }
                if outcome:
                    commit["failed"] = outcome
                commits.append(commit)
                committed.append(i)
            if aborts:
                self._master.call(
                    Op.PUT_ABORT, {"items": aborts}, timeout_s=self._left(deadline, "put")
                )
            if commits:
                reply = self._master.call(
                    Op.PUT_COMMIT, {"items": commits}, timeout_s=self._left(deadline, "put")
                )
                for i, item in zip(committed, reply["items"], strict=True):
                    if "error" in item:
                        errors[i] = error_from_wire(item["error"])
        return BatchResult(
            [
                ItemOutcome(i, str(p[0]) if isinstance(p, tuple) else "", None, e)
                for i, (p, e) in enumerate(zip(pairs, errors, strict=True))
            ]
        )

    def put_from_batch(
        self,
        keys: Sequence[str],
        buffers: Sequence[Value],
        *,
        overwrite: bool = False,
        options: PutOptions | None = None,
    ) -> BatchResult[None]:
        """Zero-copy batch put of ``buffers[i]`` under ``keys[i]``."""
        if len(keys) != len(buffers):
            raise InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        return self.put_batch(zip(keys, buffers, strict=True), overwrite=overwrite, options=options)

    def get_batch(self, keys: Sequence[str]) -> BatchResult[bytes]:
        """The bytes of every key; one outcome per key (NotFound for a missing one)."""

        def target(_i: int, loc: _Located) -> np.ndarray:
            return np.empty(loc.size, dtype=np.uint8)

        return self._get_many(keys, target, lambda _i, _loc, view: view.tobytes())

    def get_into_batch(self, keys: Sequence[str], buffers: Sequence[Value]) -> BatchResult[int]:
        """Read ``keys[i]`` into ``buffers[i]`` (no copy); outcome values are the sizes read."""
        if len(keys) != len(buffers):
            raise InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [
            byte_view(b, what=f"buffer for key {k!r}", writable=True)
            for k, b in zip(keys, buffers, strict=True)
        ]

        def target(i: int, loc: _Located) -> np.ndarray:
            view = views[i]
            if view.nbytes < loc.size:
                raise InvalidArgument(
                    f"buffer of {view.nbytes} bytes is smaller than key {loc.key!r} "
                    f"({loc.size} bytes)"
                )
            return view[: loc.size]

        return self._get_many(keys, target, lambda _i, loc, _view: loc.size)

    def exists_batch(self, keys: Sequence[str]) -> BatchResult[bool]:
        return self._simple(Op.EXISTS, keys, lambda ok: bool(ok["exists"]))

    def remove_batch(self, keys: Sequence[str]) -> BatchResult[None]:
        return self._simple(Op.REMOVE, keys, lambda ok: None)

    # -- tensors -------------------------------------------------------------------------

    def put_tensor(
        self,
        key: str,
        tensor: object,
        *,
        overwrite: bool = False,
        options: PutOptions | None = None,
    ) -> None:
        """Store a CPU torch tensor or numpy array; dtype and shape are kept with it."""
        attrs = {"tensor": tensor_attrs(tensor, what=f"value of key {key!r}")}
        self.put_batch([(key, tensor)], overwrite=overwrite, options=options, attrs=[attrs])[
            0
        ].unwrap()

    def _put_one(
        self, key: str, view: np.ndarray, opts: PutOptions, attrs: dict[str, Any] | None
    ) -> None:
        """``put_batch`` of one item without its per-item bookkeeping: the same three steps,
        messages and errors, raised instead of returned (issue 4: a 4 KiB put's client side)."""
        deadline = time.monotonic() + self.config.timeout_s
        request: dict[str, Any] = {"key": key, "size": view.nbytes}
        wire = opts.to_wire()
        if wire:
            request["options"] = wire
        if attrs:
            request["attrs"] = attrs
        kind = writer_kind()
        size = view.nbytes
        # Default options (overwrite aside) and a size a started put can hold: use one kept
        # from the last commit, and start the next one with this commit.
        ahead = size if 0 < size <= DIRECT_MAX_BYTES and wire.keys() <= {"overwrite"} else 0
        slot = self._take_slot(size, deadline) if ahead else None
        if ahead and ahead != self._last_size:  # start puts ahead only for repeating sizes
            self._last_size = ahead
            ahead = 0
        if slot is not None and self._put_into(
            slot, key, view, kind=kind, overwrite=opts.overwrite, attrs=attrs, deadline=deadline
        ):
            return
        # The checksum: computed while the master allocates, or (big, KVH-64) inside the copy.
        digest: list[int] = []
        fused = kind is ChecksumKind.KVH_64 and size >= _FUSED_HASH_BYTES
        reply = self._master.call(
            Op.PUT_START,
            {"items": [request]},
            timeout_s=self._left(deadline, "put"),
            while_waiting=None if fused else lambda: digest.append(checksum(view.data, kind)),
        )
        item = reply["items"][0]
        if "error" in item:
            raise error_from_wire(item["error"])
        put_id = item["ok"]["put_id"]
        replicas = item["ok"]["replicas"]
        targets = (
            [self._direct_target(view, str(seg), int(off)) for _node, seg, off, _tier in replicas]
            if 0 < size <= DIRECT_MAX_BYTES
            else [None]
        )
        written: list[int] | StoreError = []
        if all(target is not None for target in targets):
            for target in targets:
                if target is None:
                    continue
                # Streaming stores: this process does not read the node's copy back.
                if fused and not digest:
                    digest.append(copy_host_hashed(target, view, stream=True))
                else:
                    copy_host(target, view, stream=True)
        else:  # not all same-host (or big): the engine writes them, failures per replica
            written = self._write_all([(key, view, replicas)], deadline)[0]
        if isinstance(written, StoreError):
            self._master.call(
                Op.PUT_ABORT, {"items": [{"put_id": put_id}]}, timeout_s=self._left(deadline, "put")
            )
            raise written
        if not digest:
            digest.append(checksum(view.data, kind))
        commit: dict[str, Any] = {
            "put_id": put_id,
            "checksum": digest[0],
            "checksum_kind": str(kind),
        }
        if written:
            commit["failed"] = written
        item = self._commit(commit, ahead, deadline)
        if "error" in item:
            raise error_from_wire(item["error"])

    def _put_into(
        self,
        slot: _Slot,
        key: str,
        view: np.ndarray,
        *,
        kind: ChecksumKind,
        overwrite: bool,
        attrs: dict[str, Any] | None,
        deadline: float,
    ) -> bool:
        """Put through a started put: write, then commit naming the key. False when the slot
        is lost (expired, the master restarted, its node died; the caller then starts over);
        raises the put's own errors (AlreadyExists, a bad key or attrs)."""
        targets = [
            self._direct_target(view, str(seg), int(off)) for _n, seg, off, _t in slot.replicas
        ]
        digest: int | None = None
        written: list[int] | StoreError = []
        if all(target is not None for target in targets):
            for target in targets:
                if target is None:
                    continue
                if digest is None and kind is ChecksumKind.KVH_64:
                    digest = copy_host_hashed(target, view, stream=True)
                else:
                    copy_host(target, view, stream=True)
        else:
            written = self._write_all([(key, view, slot.replicas)], deadline)[0]
            if isinstance(written, StoreError):
                self._abort_slots([slot])
                return False
        commit: dict[str, Any] = {
            "put_id": slot.put_id,
            "checksum": checksum(view.data, kind) if digest is None else digest,
            "checksum_kind": str(kind),
            "key": key,
            "overwrite": overwrite,
        }
        if attrs:
            commit["attrs"] = attrs
        if written:
            commit["failed"] = written
        item = self._commit(commit, slot.size, deadline)  # a slot's size repeats by definition
        if "error" not in item:
            return True
        error = error_from_wire(item["error"])
        if isinstance(error, AlreadyExists | InvalidKey | InvalidArgument):
            raise error
        return False

    def _commit(self, commit: dict[str, Any], ahead: int, deadline: float) -> dict[str, Any]:
        """Send one PUT_COMMIT; returns its item. With ``ahead`` (a size), puts of that size
        are started behind it, up to _SLOTS_AHEAD held or coming."""
        start = None
        if ahead:
            now = time.monotonic()
            with self._slots_lock:
                coming = self._slots_coming
                for old in [i for i, (sent, _) in coming.items() if sent < now - _SLOT_MAX_AGE_S]:
                    del coming[old]
                self._slots = [s for s in self._slots if s.use_by > now]
                have = sum(s.size == ahead for s in self._slots)
                have += sum(size == ahead for _, size in coming.values())
                want = min(_SLOTS_AHEAD - have, _MAX_SLOTS - len(self._slots) - len(coming))
                start_id = next(self._start_ids)
                if want > 0:
                    coming[start_id] = (now, ahead)
            if want > 0:
                items = [{"size": ahead, "anonymous": True}] * want
                on_reply = functools.partial(self._started, start_id, ahead, now)
                start = (Op.PUT_START, {"items": items}, on_reply)
        reply = self._master.call(
            Op.PUT_COMMIT,
            {"items": [commit]},
            timeout_s=self._left(deadline, "put"),
            ahead=start,
        )
        return reply["items"][0]

    def _started(
        self, start_id: int, size: int, sent: float, reply: dict[str, Any] | StoreError
    ) -> None:
        """The reply to puts started ahead (see _commit): each started one becomes a slot.
        Runs inside whichever call reads the reply, so it never raises: a start it cannot
        use is left to expire at the master."""
        slots: list[_Slot] = []
        if isinstance(reply, dict):
            with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                for item in reply["items"]:
                    started = item.get("ok")
                    if started:  # not started (no space, say): the next put starts its own
                        age = min(float(started["expires_s"]) / 2, _SLOT_MAX_AGE_S)
                        replicas = list(started["replicas"])
                        slots.append(_Slot(size, str(started["put_id"]), replicas, sent + age))
        with self._slots_lock:
            self._slots_coming.pop(start_id, None)
            self._slots.extend(slots)

    def _take_slot(self, size: int, deadline: float) -> _Slot | None:
        """A fresh started put of ``size`` bytes, if this client holds one or one is on its way
        (stale ones are dropped: the master frees them)."""
        slot = self._pop_slot(size)
        if slot is None and self._slots_coming:
            self._master.settle(self._left(deadline, "put"))
            slot = self._pop_slot(size)
        return slot

    def _pop_slot(self, size: int) -> _Slot | None:
        now = time.monotonic()
        with self._slots_lock:  # stale ones are dropped by _commit
            slots = self._slots
            for i, slot in enumerate(slots):
                if slot.size == size and slot.use_by > now:
                    del slots[i]
                    return slot
        return None

    def _abort_slots(self, slots: list[_Slot]) -> None:
        """Give started puts back (best effort: the master frees unused ones within 2 s anyway)."""
        if not slots:
            return
        with contextlib.suppress(StoreError):
            self._master.call(
                Op.PUT_ABORT,
                {"items": [{"put_id": s.put_id} for s in slots]},
                timeout_s=self.config.timeout_s,
            )

    def get_tensor(self, key: str) -> Any:
        """A new tensor (or array) with the dtype and shape it was stored with."""

        return self._get_tensors([key])[0].unwrap()

    def _get_tensors(self, keys: Sequence[str]) -> BatchResult[Any]:
        """New tensors (or arrays) of ``keys``, read in one batch."""
        outs: dict[int, Any] = {}

        def target(i: int, loc: _Located) -> np.ndarray:
            out = outs[i] = empty_tensor(self._tensor_attrs(loc), key=loc.key)
            return byte_view(out, what=f"tensor for key {loc.key!r}")

        return self._get_many(keys, target, lambda i, _loc, _view: outs.pop(i))

    def get_tensor_into(self, key: str, tensor: object) -> None:
        """Fill a preallocated tensor (same dtype and shape) in place, without a copy."""
        self.get_tensors_into({key: tensor})[0].unwrap()

    def get_tensors_into(self, targets: Mapping[str, object]) -> BatchResult[int]:
        """Fill every preallocated tensor of ``targets`` (key -> tensor), zero-copy."""
        keys = list(targets)

        def target(i: int, loc: _Located) -> np.ndarray:
            tensor = targets[keys[i]]
            check_matches(tensor, self._tensor_attrs(loc), key=loc.key)
            return byte_view(tensor, what=f"tensor for key {loc.key!r}", writable=True)

        return self._get_many(keys, target, lambda _i, loc, _view: loc.size)

    @staticmethod
    def _tensor_attrs(loc: _Located) -> dict[str, Any]:
        attrs = loc.attrs.get("tensor")
        if not isinstance(attrs, dict):
            raise InvalidArgument(f"key {loc.key!r} was not stored with put_tensor")
        return attrs

    # -- state dicts (the weight-update path) --------------------------------------------

    def publish_state_dict(
        self,
        prefix: str,
        state_dict: Mapping[str, object],
        *,
        version: int,
        options: PutOptions | None = None,
        keep_versions: int = 2,
    ) -> None:
        """Publish every tensor under ``{prefix}/v{version}/``, then point readers at it.

        One writer: versions must increase. Readers of an older version keep their leases;
        versions older than the newest ``keep_versions`` are removed.
        """
        if not isinstance(version, int) or version < 0:
            raise InvalidArgument(f"version must be an int >= 0, got {version!r}")
        base = f"{prefix}/v{version}"
        manifest: dict[str, Any] = {}
        items: list[tuple[str, object]] = []
        attrs: list[dict[str, Any] | None] = []
        for name, tensor in state_dict.items():
            tattrs = tensor_attrs(tensor, what=f"state_dict[{name!r}]")
            manifest[name] = tattrs
            items.append((f"{base}/t/{name}", tensor))
            attrs.append({"tensor": tattrs})
        self.put_batch(items, options=options, attrs=attrs).raise_for_errors()
        self.put(
            f"{base}/manifest",
            json.dumps({"version": version, "tensors": manifest}).encode(),
            options=options,
        )
        self.put(f"{prefix}/latest", str(version).encode(), overwrite=True, options=options)
        for old in range(max(0, version - 64), version - keep_versions + 1):
            self._drop_version(prefix, old)

    def _drop_version(self, prefix: str, version: int) -> None:
        base = f"{prefix}/v{version}"
        try:
            manifest = json.loads(self.get(f"{base}/manifest"))
        except NotFound:
            return
        keys = [f"{base}/t/{name}" for name in manifest["tensors"]] + [f"{base}/manifest"]
        self.remove_batch(keys)

    def latest_version(self, prefix: str) -> int:
        """The version readers of ``prefix`` load by default; raises NotFound."""
        return int(self.get(f"{prefix}/latest"))

    def load_state_dict(
        self,
        prefix: str,
        into: Mapping[str, object] | None = None,
        *,
        version: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """(version, state_dict) of ``prefix``: the latest one unless ``version`` is given.

        With ``into`` (name -> preallocated tensor of the published dtype and shape), the bytes
        land in those tensors without a copy and they are returned.
        """
        if version is None:
            version = self.latest_version(prefix)
        base = f"{prefix}/v{version}"
        manifest = json.loads(self.get(f"{base}/manifest"))["tensors"]
        if into is None:
            keys = [f"{base}/t/{name}" for name in manifest]
            values = self._get_tensors(keys).values()
            return version, dict(zip(manifest, values, strict=True))
        missing = set(manifest) ^ set(into)
        if missing:
            raise InvalidArgument(
                f"state_dict of {base!r} and the destination differ in {sorted(missing)[:5]}"
            )
        self.get_tensors_into(
            {f"{base}/t/{name}": into[name] for name in manifest}
        ).raise_for_errors()
        return version, dict(into)

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The master's view: objects, bytes, nodes, per-segment usage and fragmentation."""
        return self._master.call_retrying(Op.STATS, {}, timeout_s=self.config.timeout_s)

    # -- internals -----------------------------------------------------------------------

    def _left(self, deadline: float, what: str, key: str | None = None) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoreTimeout(what, timeout_s=self.config.timeout_s, key=key)
        return left

    def _pool_get(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            pool = self._pool
            if pool is None:
                pool = ThreadPoolExecutor(_TRANSFER_THREADS, thread_name_prefix="kvstack-store-io")
                self._pool = pool
            return pool

    def _checksums(
        self, views: Sequence[np.ndarray], kind: ChecksumKind, known: Sequence[int | None]
    ) -> list[int]:
        """The ``kind`` checksum of each view, keeping those ``known`` already (not None)."""
        missing = [k for k, digest in enumerate(known) if digest is None]
        todo = [views[k] for k in missing]
        if kind is ChecksumKind.KVH_64:  # one call, shared by the native copier's threads
            computed = kvhash64_many(todo)
        elif len(todo) > 1 and sum(v.nbytes for v in todo) >= _PARALLEL_BYTES:
            computed = list(self._pool_get().map(functools.partial(_checksum_of, kind), todo))
        else:
            computed = [checksum(v.data, kind) for v in todo]
        out = [0 if digest is None else digest for digest in known]
        for k, digest in zip(missing, computed, strict=True):
            out[k] = digest
        return out

    def _verified(self, items: Sequence[tuple[int, _Located, np.ndarray]]) -> list[bool]:
        """Whether each item's view holds its object's checksum (by the kind it was put with)."""
        good = [False] * len(items)
        for kind in {loc.checksum_kind for _i, loc, _view in items}:
            which = [k for k, (_i, loc, _v) in enumerate(items) if loc.checksum_kind is kind]
            views = [items[k][2] for k in which]
            digests = self._checksums(views, kind, [None] * len(views))
            for k, digest in zip(which, digests, strict=True):
                good[k] = digest == items[k][1].checksum
        return good

    def _transfer(
        self, op: TransferOp, items: list[BufferItem], deadline: float, what: str
    ) -> dict[int, TransferError]:
        """One engine batch over caller buffers; index -> error of each failed item."""
        timeout_s = self._left(deadline, what)
        if len(items) == 1:  # the one-off path: over tcp, this thread's own connection
            try:
                self._engine.transfer_buffers(op, items, timeout_s=timeout_s)
            except BatchFailed as exc:
                return dict(exc.failures)
            return {}
        batch = self._engine.submit_buffers(op, items, timeout_s=timeout_s)
        batch.wait()
        return batch.failures()

    def _read_verified(
        self, batched: list[tuple[int, _Located, np.ndarray]], deadline: float
    ) -> list[tuple[int, _Located, np.ndarray]]:
        """Read each item's first replica: same-host ones copied from the engine's mapping (a
        big batch in groups, one per pool thread), the others in one engine batch. Returns the
        items that arrived and match their checksum (if verifying); the others fail over in
        ``_read``."""
        verify = self.config.verify_checksums
        items: list[BufferItem] = []
        engine: list[tuple[int, _Located, np.ndarray]] = []
        direct: list[tuple[int, _Located, np.ndarray]] = []
        sources: list[np.ndarray] = []
        mapped: dict[str, np.ndarray | None] = {}
        for b in batched:
            _i, loc, view = b
            source = self._direct(loc, mapped)
            if source is not None:
                direct.append(b)
                sources.append(source)
                continue
            _node, segment, offset = loc.replicas[0]
            items.append((view, segment, offset))
            engine.append(b)
        good: list[bool] = []
        views = [view for _i, _loc, view in direct]
        if verify and all(loc.checksum_kind is ChecksumKind.KVH_64 for _i, loc, _v in direct):
            # Copy and check in one pass, by 64 KiB blocks over the native copier's threads.
            digests = copy_host_many_hashed(views, sources)
            good = [d == loc.checksum for d, (_i, loc, _v) in zip(digests, direct, strict=True)]
        elif direct:
            copy_host_many(views, sources)
            good = self._verified(direct) if verify else [True] * len(direct)
        arrived = direct
        if items:
            try:
                failures = self._transfer(TransferOp.READ, items, deadline, "get")
            except (StoreError, TransferError):  # out of time, or refused: item by item instead
                failures = dict.fromkeys(range(len(items)))
            engine = [b for k, b in enumerate(engine) if k not in failures]
            good += self._verified(engine) if verify else [True] * len(engine)
            arrived = direct + engine
        return [b for b, ok in zip(arrived, good, strict=True) if ok]  # a mismatch fails over

    def _write_all(
        self,
        puts: list[tuple[str, np.ndarray, list[list[Any]]]],
        deadline: float,
        *,
        digests: list[int | None] | None = None,
    ) -> list[list[int] | StoreError]:
        """Write every replica of every (key, view, replicas) in one engine batch; per put, the
        replica indices that failed, or ReplicaUnavailable if all did (the master
        re-replicates what is missing after the commit). With ``digests``, a put copied into a
        same-host segment gets its KVH-64 there, computed inside the copy."""
        items: list[BufferItem] = []
        where: list[tuple[int, int]] = []  # (put, replica) of each item
        for p, (_key, view, replicas) in enumerate(puts):
            size = view.nbytes
            if not size:
                continue
            for r, (_node, seg, off, _tier) in enumerate(replicas):
                segment, offset = str(seg), int(off)
                target = (
                    self._direct_target(view, segment, offset) if size <= DIRECT_MAX_BYTES else None
                )
                if target is not None:
                    # Streaming stores: this process does not read the node's copy back.
                    if digests is not None and digests[p] is None:
                        digests[p] = copy_host_hashed(target, view, stream=True)
                    else:
                        copy_host(target, view, stream=True)
                    continue
                items.append((view, segment, offset))
                where.append((p, r))
        try:
            failures = self._transfer(TransferOp.WRITE, items, deadline, "put") if items else {}
        except TransferError as exc:  # the engine refused the whole batch
            failures = dict.fromkeys(range(len(items)), exc)
        failed: list[list[int]] = [[] for _ in puts]
        reasons: list[list[str]] = [[] for _ in puts]
        for index, first_error in sorted(failures.items()):
            p, r = where[index]
            key, view, replicas = puts[p]
            node, segment, offset, _tier = replicas[r]
            error = first_error
            if isinstance(first_error, SegmentNotFound):
                # Not known to the metadata service for a moment: retry it alone, briefly.
                try:
                    self._write_one(view, str(segment), int(offset), key, deadline)
                    continue
                except TransferError as exc:
                    error = exc
            failed[p].append(r)
            reasons[p].append(f"write to node {node!r}: {error}")
        out: list[list[int] | StoreError] = []
        for p, (key, view, replicas) in enumerate(puts):
            if view.nbytes and len(failed[p]) == len(replicas):
                out.append(ReplicaUnavailable(key, reasons=reasons[p]))
            else:
                out.append(failed[p])
        return out

    def _write_one(
        self, view: np.ndarray, segment: str, offset: int, key: str, deadline: float
    ) -> None:
        # A live segment's record may be missing for a moment (the metadata service restarted
        # with the master; the node re-publishes it within a second): retry that briefly.
        give_up = min(deadline, time.monotonic() + _SEGMENT_RETRY_S)
        delay = 0.02
        while True:
            try:
                self._engine.write_tensor(
                    view,
                    segment,
                    remote_offset=offset,
                    timeout_s=self._left(deadline, f"put of key {key!r}", key),
                )
                return
            except SegmentNotFound:
                if time.monotonic() + delay >= give_up:
                    raise
            time.sleep(delay)  # back-off before resolving the segment again
            delay = min(delay * 2, 0.25)

    def _direct(
        self, loc: _Located, mapped: dict[str, np.ndarray | None] | None = None
    ) -> np.ndarray | None:
        """The first replica's bytes in the engine's same-host mapping (no copy), or None.

        An object's get through a transfer batch costs more in bookkeeping than the copy
        (16 us back to back, 40-50 us right after the master's reply, against ~2 us of memcpy
        on the 2-core box). The master's read lease keeps the range from reuse while it is
        read, and the checksum is verified; anything else goes through ``_read``. A batch
        passes ``mapped`` so that each segment is looked up (and checked) once.
        """
        if loc.size > DIRECT_MAX_BYTES or not loc.replicas:
            return None
        _node, segment, offset = loc.replicas[0]
        if mapped is None:
            array = self._engine.map_segment(segment)
        elif segment in mapped:
            array = mapped[segment]
        else:
            array = mapped[segment] = self._engine.map_segment(segment)
        if array is None or offset + loc.size > array.nbytes:
            return None
        return array[offset : offset + loc.size]

    def _direct_target(self, view: np.ndarray, segment: str, offset: int) -> np.ndarray | None:
        """Where a replica of ``view`` goes in a same-host segment's mapping, copied with one
        memcpy (see ``_direct``); None when it is not reachable that way: the engine then
        writes it."""
        dest = self._engine.map_segment(segment)
        if dest is None or not dest.flags.writeable or offset + view.nbytes > dest.nbytes:
            return None
        return dest[offset : offset + view.nbytes]

    def _read_direct(self, loc: _Located) -> bytes | None:
        """A small object's verified bytes copied from a same-host mapping, or None: the
        engine path then reads (and fails over, and names the error)."""
        source = self._direct(loc)
        if source is None:
            return None
        if not self.config.verify_checksums:
            return source.tobytes()
        if loc.checksum_kind is ChecksumKind.KVH_64 and loc.size >= _FUSED_HASH_BYTES:
            # Copy and hash in one pass (4 KiB: tobytes and a hash are 1 us cheaper).
            data, digest = bytes_hashed(source)
            return data if digest == loc.checksum else None
        data = source.tobytes()
        return data if loc.verifies(data) else None

    def _read(self, loc: _Located, view: np.ndarray, deadline: float) -> None:
        """Fill ``view`` (exactly loc.size bytes) from a replica, failing over in order."""
        if not loc.size:
            return
        reasons: list[str] = []
        for node, segment, offset in loc.replicas:
            try:
                self._engine.read_into_tensor(
                    view,
                    segment,
                    remote_offset=offset,
                    timeout_s=self._left(deadline, f"get of key {loc.key!r}", loc.key),
                )
            except TransferError as exc:
                reasons.append(f"node {node!r}: {exc}")
                continue
            if not self.config.verify_checksums:
                return
            actual = checksum(view.data, loc.checksum_kind)
            if actual == loc.checksum:
                return
            reasons.append(
                str(ChecksumMismatch(loc.key, expected=loc.checksum, actual=actual, replica=node))
            )
        if not loc.replicas:
            reasons.append("no live replica")
        raise ReplicaUnavailable(loc.key, reasons=reasons)

    def _locate(self, keys: Sequence[str], deadline: float) -> list[_Located | StoreError]:
        out: list[_Located | StoreError | None] = [None] * len(keys)
        valid: list[int] = []
        for i, key in enumerate(keys):
            try:
                check_key(key)
                valid.append(i)
            except StoreError as exc:
                out[i] = exc
        if valid:
            reply = self._master.call_retrying(
                Op.GET,
                {"items": [{"key": keys[i]} for i in valid]},
                timeout_s=self._left(deadline, "get"),
            )
            located = self._located
            for i, item in zip(valid, reply["items"], strict=True):
                ok = item.get("ok")
                out[i] = error_from_wire(item["error"]) if ok is None else located(keys[i], ok)
        return [StoreError("internal: an item was not located") if o is None else o for o in out]

    @staticmethod
    def _located(key: str, ok: dict[str, Any]) -> _Located:
        # The master's reply (protocol 3): types as sent, so no conversions per field.
        kind = ok.get("checksum_kind")
        return _Located(
            key,
            ok["size"],
            ok["checksum"],
            ok["attrs"],
            [(n, s, o) for n, s, o in ok["replicas"]],
            DEFAULT_KIND if kind is None else parse_kind(kind, what=f"key {key!r}"),
            ok.get("lease", 0),
        )

    def _get_many(
        self,
        keys: Sequence[str],
        target: Callable[[int, _Located], np.ndarray],
        finish: Callable[[int, _Located, np.ndarray], T],
    ) -> BatchResult[T]:
        """Locate ``keys`` (one master round trip), read every first replica in ONE engine
        batch into ``target(i, loc)`` (a uint8 view of exactly loc.size bytes), verify, and
        return ``finish(i, loc, view)``; failed items fail over one by one (``_read``)."""
        deadline = time.monotonic() + self.config.timeout_s
        keys = list(keys)
        located = self._locate(keys, deadline)
        relocated: list[_Located | StoreError] = []  # by fail-overs: released at the end too
        result = self._get_located(
            keys, located, relocated=relocated, deadline=deadline, target=target, finish=finish
        )
        # Only once every read is over: an exception may leave the pool's reads running (their
        # leases then end by time).
        self._release(located)
        self._release(relocated)
        return result

    def _release(self, located: Sequence[_Located | StoreError]) -> None:
        """This client reads no more under these items' GET leases: the master may end them
        (and free bytes they held back) at its next request. Call once per item located."""
        leases = [loc.lease for loc in located if isinstance(loc, _Located) and loc.lease]
        if leases:
            self._master.release(leases)

    def _get_located(
        self,
        keys: list[str],
        located: list[_Located | StoreError],
        *,
        relocated: list[_Located | StoreError],
        deadline: float,
        target: Callable[[int, _Located], np.ndarray],
        finish: Callable[[int, _Located, np.ndarray], T],
    ) -> BatchResult[T]:
        """_get_many once located (see there); locations of fail-overs go into ``relocated``."""
        n = len(keys)
        outcomes: list[ItemOutcome[T] | None] = [None] * n
        views: list[np.ndarray | None] = [None] * n
        batched: list[tuple[int, _Located, np.ndarray]] = []
        for i, loc in enumerate(located):
            if isinstance(loc, ReplicaUnavailable):
                continue  # no replica right now: the retrying path below asks again
            if isinstance(loc, StoreError):
                outcomes[i] = ItemOutcome(i, keys[i], None, loc)
                continue
            try:
                view = views[i] = target(i, loc)
            except StoreError as exc:
                outcomes[i] = ItemOutcome(i, keys[i], None, exc)
                continue
            if not loc.size:
                outcomes[i] = ItemOutcome(i, keys[i], finish(i, loc, view), None)
            elif loc.replicas:
                batched.append((i, loc, view))
        read = self._read_verified(batched, deadline) if batched else batched
        for i, loc, view in read:
            outcomes[i] = ItemOutcome(i, keys[i], finish(i, loc, view), None)
        rest = [i for i in range(n) if outcomes[i] is None]
        if not rest:
            return BatchResult([o for o in outcomes if o is not None])

        def one(i: int) -> ItemOutcome[T]:
            # Fail-over, checksum mismatch, or no replica yet: replica by replica, re-locating
            # until the deadline (replicas move when a node dies or the master restarts).
            loc = located[i]
            delay = 0.01
            while True:
                try:
                    if isinstance(loc, StoreError):
                        raise loc
                    view = views[i]
                    if view is None:
                        view = views[i] = target(i, loc)
                    self._read(loc, view, deadline)
                    return ItemOutcome(i, keys[i], finish(i, loc, view), None)
                except ReplicaUnavailable as exc:
                    if time.monotonic() + delay >= deadline:
                        return ItemOutcome(i, keys[i], None, exc)
                    time.sleep(delay)  # back-off before asking the master again
                    delay = min(delay * 2, 0.25)
                    try:
                        loc = self._locate([keys[i]], deadline)[0]
                    except StoreError as err:
                        return ItemOutcome(i, keys[i], None, err)
                    relocated.append(loc)  # list.append: safe from the pool's threads
                    old = views[i]
                    if isinstance(loc, _Located) and old is not None and old.nbytes != loc.size:
                        views[i] = None  # rewritten with another size: a new target
                except StoreError as exc:
                    return ItemOutcome(i, keys[i], None, exc)

        total = sum(loc.size for i in rest if isinstance(loc := located[i], _Located))
        if len(rest) > 1 and total >= _PARALLEL_BYTES:
            for outcome in self._pool_get().map(one, rest):
                outcomes[outcome.index] = outcome
        else:
            for i in rest:
                outcomes[i] = one(i)
        return BatchResult([o for o in outcomes if o is not None])

    def _simple(
        self, op: Op, keys: Sequence[str], value: Callable[[dict[str, Any]], T]
    ) -> BatchResult[T]:
        errors: dict[int, StoreError] = {}
        valid: list[int] = []
        for i, key in enumerate(keys):
            try:
                check_key(key)
                valid.append(i)
            except StoreError as exc:
                errors[i] = exc
        results: dict[int, T] = {}
        if valid:
            call = self._master.call_retrying if op is Op.EXISTS else self._master.call
            reply = call(
                op, {"items": [{"key": keys[i]} for i in valid]}, timeout_s=self.config.timeout_s
            )
            for i, item in zip(valid, reply["items"], strict=True):
                if "error" in item:
                    errors[i] = error_from_wire(item["error"])
                else:
                    results[i] = value(item["ok"])
        return BatchResult(
            [ItemOutcome(i, k, results.get(i), errors.get(i)) for i, k in enumerate(keys)]
        )


class AsyncStoreClient:
    """The asyncio face of StoreClient: each call runs the sync one on this client's executor."""

    def __init__(
        self, config: ClientConfig | None = None, *, _client: StoreClient | None = None
    ) -> None:
        self._sync = _client or StoreClient(config)
        self._executor = ThreadPoolExecutor(
            self._sync.config.async_workers, thread_name_prefix="kvstack-store-async"
        )

    @classmethod
    def embedded(
        cls, memory: int | str = "256MiB", *, disk_dir: str | None = None
    ) -> AsyncStoreClient:
        """An AsyncStoreClient over a whole store in this process (see StoreClient.embedded)."""
        return cls(_client=StoreClient.embedded(memory, disk_dir=disk_dir))

    @property
    def sync(self) -> StoreClient:
        return self._sync

    async def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def __aenter__(self) -> AsyncStoreClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._run(self._sync.close)
        self._executor.shutdown(wait=False)

    async def put(
        self, key: str, data: Value, *, overwrite: bool = False, options: PutOptions | None = None
    ) -> None:
        await self._run(self._sync.put, key, data, overwrite=overwrite, options=options)

    async def put_from(
        self, key: str, buffer: Value, *, overwrite: bool = False, options: PutOptions | None = None
    ) -> None:
        await self._run(self._sync.put_from, key, buffer, overwrite=overwrite, options=options)

    async def get(self, key: str) -> bytes:
        return await self._run(self._sync.get, key)

    async def get_into(self, key: str, buffer: Value) -> int:
        return await self._run(self._sync.get_into, key, buffer)

    async def exists(self, key: str) -> bool:
        return await self._run(self._sync.exists, key)

    async def remove(self, key: str) -> None:
        await self._run(self._sync.remove, key)

    async def put_batch(
        self,
        items: Mapping[str, Value] | Iterable[tuple[str, Value]],
        *,
        overwrite: bool = False,
        options: PutOptions | None = None,
    ) -> BatchResult[None]:
        return await self._run(self._sync.put_batch, items, overwrite=overwrite, options=options)

    async def get_batch(self, keys: Sequence[str]) -> BatchResult[bytes]:
        return await self._run(self._sync.get_batch, keys)

    async def get_into_batch(
        self, keys: Sequence[str], buffers: Sequence[Value]
    ) -> BatchResult[int]:
        return await self._run(self._sync.get_into_batch, keys, buffers)

    async def exists_batch(self, keys: Sequence[str]) -> BatchResult[bool]:
        return await self._run(self._sync.exists_batch, keys)

    async def remove_batch(self, keys: Sequence[str]) -> BatchResult[None]:
        return await self._run(self._sync.remove_batch, keys)

    async def put_tensor(
        self,
        key: str,
        tensor: object,
        *,
        overwrite: bool = False,
        options: PutOptions | None = None,
    ) -> None:
        await self._run(self._sync.put_tensor, key, tensor, overwrite=overwrite, options=options)

    async def get_tensor(self, key: str) -> Any:
        return await self._run(self._sync.get_tensor, key)

    async def get_tensor_into(self, key: str, tensor: object) -> None:
        await self._run(self._sync.get_tensor_into, key, tensor)

    async def publish_state_dict(
        self,
        prefix: str,
        state_dict: Mapping[str, object],
        *,
        version: int,
        options: PutOptions | None = None,
        keep_versions: int = 2,
    ) -> None:
        await self._run(
            self._sync.publish_state_dict,
            prefix,
            state_dict,
            version=version,
            options=options,
            keep_versions=keep_versions,
        )

    async def load_state_dict(
        self, prefix: str, into: Mapping[str, object] | None = None, *, version: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        return await self._run(self._sync.load_state_dict, prefix, into, version=version)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self._sync.stats)
