"""Batches: the handle a submit returns, with a status per request, and the Work transports run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from kvstack.transfer import _metrics
from kvstack.transfer._memory import LocalSegment
from kvstack.transfer._types import (
    Op,
    RequestStatus,
    SegmentInfo,
    TransferOutcome,
    TransferRequest,
)
from kvstack.transfer.errors import BatchFailed, TransferError, TransferTimeout

__all__ = ["Batch", "Pages", "Route", "Work"]

logger = logging.getLogger(__name__)


class Route:
    """Where a group of a batch's requests goes: one remote segment, one transport, one op.

    Shared by the requests of the group, so per-request bookkeeping stays one object.
    """

    __slots__ = ("op", "remote", "totals", "transport")

    def __init__(self, remote: SegmentInfo, transport: str, op: str) -> None:
        self.remote = remote
        self.transport = transport
        self.op = op
        self.totals = [0, 0]  # [requests, bytes] completed, for metrics


class Pages(NamedTuple):
    """A batch that is one run of ranges between one local host segment and one remote one,
    as arrays (the KV-page handoff path: Engine.submit_pages, and submit's fast path).
    """

    route: Route
    local: LocalSegment
    op: Op
    # int64 [3, n]: local offsets, remote offsets, lengths. One array, so that checking it
    # takes one reduction per kind, not one per column: right after a big copy has flushed
    # the caches each numpy call costs tens of us (2-core box, see RESULTS.md).
    table: np.ndarray
    timeout_s: float | None = None  # the caller's, carried into requests()

    @property
    def local_offsets(self) -> np.ndarray:
        return self.table[0]

    @property
    def remote_offsets(self) -> np.ndarray:
        return self.table[1]

    @property
    def lengths(self) -> np.ndarray:
        return self.table[2]

    def requests(self) -> tuple[TransferRequest, ...]:
        """The ranges as TransferRequests (built only when someone asks for them)."""
        op, local, remote = self.op, self.local.name, self.route.remote.name
        return tuple(
            TransferRequest(op, local, local_offset, remote, remote_offset, length, self.timeout_s)
            for local_offset, remote_offset, length in zip(*self.table.tolist(), strict=True)
        )

    def describe(self, index: int) -> str:
        return (
            f"{self.op} of {self.lengths[index]} bytes at offset {self.remote_offsets[index]} "
            f"of segment {self.route.remote.name!r}"
        )


class Work:
    """One request handed to a transport: it calls ``done()`` once per part (see ``split``)."""

    __slots__ = ("batch", "index", "local", "request", "route")

    def __init__(
        self, batch: Batch, index: int, request: TransferRequest, local: LocalSegment, route: Route
    ) -> None:
        self.batch = batch
        self.index = index
        self.request = request
        self.local = local
        self.route = route

    @property
    def remote(self) -> SegmentInfo:
        return self.route.remote

    @property
    def transport(self) -> str:
        return self.route.transport

    @property
    def deadline(self) -> float:
        return self.batch._deadline_of(self.index)

    def split(self, parts: int) -> None:
        """Announce that this request completes after ``parts`` calls of ``done`` (stripes)."""
        self.batch._add_parts(self.index, parts - 1)

    def done(self, error: TransferError | None = None) -> None:
        self.batch._part_done(self.index, error)

    def expired(self) -> bool:
        return (
            time.monotonic() > self.deadline
            or self.batch._status[self.index] is not RequestStatus.PENDING
        )

    def describe(self) -> str:
        r = self.request
        return f"{r.op} of {r.length} bytes at offset {r.remote_offset} of segment {r.remote!r}"


class Batch:
    """Handle of submitted requests: ``poll()``, ``wait()``, ``outcomes()``, ``raise_for_errors()``.

    Every request ends DONE or FAILED by its deadline: ``wait()`` never blocks past the latest one.
    A FAILED request may have moved some of its bytes; a DONE one moved all of them.
    """

    def __init__(
        self,
        requests: Sequence[TransferRequest] = (),
        *,
        pages: Pages | None = None,
        default_timeout_s: float,
        on_error: Callable[[str, TransferError], None] | None = None,
    ) -> None:
        # A page batch (``pages``) holds its requests as arrays: TransferRequest objects cost
        # ~1 us each, the whole budget of a fast 256-page handoff (issue #3).
        self._pages = pages
        self._requests: tuple[TransferRequest, ...] | None = None
        if pages is None:
            self._requests = tuple(requests)
            n = len(self._requests)
        else:
            n = pages.table.shape[1]
        self._n = n
        self._started = time.monotonic()
        self._default_timeout_s = default_timeout_s
        # index -> timeout_s of the requests that carry their own (the engine fills it).
        self._timeouts: dict[int, float] = {}
        self._status = [RequestStatus.PENDING] * n
        self._errors: list[TransferError | None] = [None] * n
        self._extra_parts: dict[int, int] = {}  # index -> stripes still to come beyond one
        self._pending = n
        self._works: list[Work | None] = [None] * n
        self._routes: list[Route] = []  # filled by the engine; metrics are summed per route
        self._lock = threading.Lock()
        # Created only when someone must block: most shm batches finish inside submit().
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[Batch], None]] = []
        self._on_error = on_error  # called with the remote segment's name
        # Caller buffers of Engine.submit_buffers: alive until the batch is (no copy may land
        # in freed memory).
        self._keepalive: object = None

    def __len__(self) -> int:
        return self._n

    @property
    def requests(self) -> tuple[TransferRequest, ...]:
        """The batch's requests, in submit order (a page batch builds them on first use)."""
        requests = self._requests
        if requests is None:
            pages = self._pages
            requests = self._requests = pages.requests() if pages is not None else ()
        return requests

    def __repr__(self) -> str:
        counts = {s: self._status.count(s) for s in RequestStatus}
        return f"<Batch of {len(self)}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ">"

    # -- what transports call -------------------------------------------------------------

    def _timeout_of(self, index: int) -> float:
        return self._timeouts.get(index, self._default_timeout_s)

    def _deadline_of(self, index: int) -> float:
        return self._started + self._timeouts.get(index, self._default_timeout_s)

    def _add_parts(self, index: int, extra: int) -> None:
        with self._lock:
            self._extra_parts[index] = self._extra_parts.get(index, 0) + extra

    def _part_done(self, index: int, error: TransferError | None) -> None:
        with self._lock:
            if self._status[index] is not RequestStatus.PENDING:
                return  # already failed (deadline, another stripe): the first verdict stands
            if error is None:
                extra = self._extra_parts.get(index, 0)
                if extra:
                    self._extra_parts[index] = extra - 1
                    return
            callbacks = self._finish(index, error)
        self._run(callbacks)

    _fail = _part_done

    def _finish(self, index: int, error: TransferError | None) -> list[Callable[[Batch], Any]]:
        # Called with self._lock held; returns the done-callbacks to run once it is released.
        self._status[index] = RequestStatus.DONE if error is None else RequestStatus.FAILED
        self._errors[index] = error
        self._pending -= 1
        if error is not None:
            # The route that counted this request (none if it failed before it had one).
            work = self._works[index]
            route: Route | None = None
            length = 0
            if work is not None:
                route, length = work.route, work.request.length
            elif self._pages is not None:
                route, length = self._pages.route, int(self._pages.lengths[index])
            if route is None:
                _metrics.record_error("none", "none", type(error).__name__)
                remote = self.requests[index].remote
            else:
                _metrics.record_error(route.transport, route.remote.peer, type(error).__name__)
                route.totals[0] -= 1
                route.totals[1] -= length
                remote = route.remote.name
            if self._on_error is not None:
                self._on_error(remote, error)
        if self._pending:
            return []
        self._record()
        if self._event is not None:
            self._event.set()
        callbacks = self._callbacks
        self._callbacks = []
        return callbacks

    def _done_range(self, start: int, stop: int) -> None:
        """Requests start..stop-1 (unsplit) are DONE."""
        pending = RequestStatus.PENDING
        with self._lock:
            status = self._status
            if status[start:stop].count(pending) == stop - start:
                # The usual case (none failed): list operations in C, not a loop per request.
                status[start:stop] = [RequestStatus.DONE] * (stop - start)
                self._pending -= stop - start
            else:
                for index in range(start, stop):
                    if status[index] is pending:
                        status[index] = RequestStatus.DONE
                        self._pending -= 1
            callbacks: list[Callable[[Batch], Any]] = []
            if self._pending == 0 and stop > start:
                self._record()
                if self._event is not None:
                    self._event.set()
                callbacks = self._callbacks
                self._callbacks = []
        self._run(callbacks)

    def _fail_range(self, start: int, stop: int, error: TransferError) -> None:
        """Requests start..stop-1 of a page batch, those still pending, failed with ``error``."""
        callbacks: list[Callable[[Batch], Any]] = []
        with self._lock:
            for index in range(start, stop):
                if self._status[index] is RequestStatus.PENDING:
                    callbacks += self._finish(index, error)
        self._run(callbacks)

    def _done_all(self) -> None:
        """Every request DONE at once (the engine's array path over shm)."""
        with self._lock:
            self._status = [RequestStatus.DONE] * self._n
            self._pending = 0
            self._record()
            if self._event is not None:
                self._event.set()
            callbacks = self._callbacks
            self._callbacks = []
        self._run(callbacks)

    def _done_many(self, indices: Sequence[int]) -> None:
        """Mark unsplit requests DONE in one go (transports that copy synchronously)."""
        with self._lock:
            status = self._status
            for index in indices:
                if status[index] is RequestStatus.PENDING:
                    status[index] = RequestStatus.DONE
                    self._pending -= 1
            callbacks: list[Callable[[Batch], Any]] = []
            if self._pending == 0 and indices:
                self._record()
                if self._event is not None:
                    self._event.set()
                callbacks = self._callbacks
                self._callbacks = []
        self._run(callbacks)

    def _record(self) -> None:
        # Metrics once per batch (with the lock held), not per request: a 256-page batch would
        # otherwise spend more time in prometheus_client than in memcpy.
        seconds = time.monotonic() - self._started
        for route in self._routes:
            count, length = route.totals
            if count:
                _metrics.record_done(
                    route.transport,
                    route.remote.peer,
                    route.op,
                    count=count,
                    length=length,
                    seconds=seconds,
                )

    def _run(self, callbacks: list[Callable[[Batch], Any]]) -> None:
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("batch done-callback %r failed", callback)

    def _expire(self) -> None:
        """Fail every pending request whose deadline passed."""
        now = time.monotonic()
        callbacks: list[Callable[[Batch], Any]] = []
        with self._lock:
            if not self._pending:  # _wait calls this once done too: no loop per request then
                return
            for i, status in enumerate(self._status):
                if status is RequestStatus.PENDING and self._deadline_of(i) <= now:
                    work = self._works[i]
                    pages = self._pages
                    if work is not None:
                        what, peer = work.describe(), work.remote.peer
                    elif pages is not None:
                        what, peer = pages.describe(i), pages.route.remote.peer
                    else:
                        what, peer = f"request {i}", None
                    error = TransferTimeout(what, timeout_s=self._timeout_of(i), peer=peer)
                    callbacks += self._finish(i, error)
        self._run(callbacks)

    def _next_deadline(self) -> float:
        with self._lock:
            if not self._pending:
                return time.monotonic()
            if not self._timeouts:
                return self._started + self._default_timeout_s
            pending = [
                self._deadline_of(i)
                for i, s in enumerate(self._status)
                if s is RequestStatus.PENDING
            ]
        return min(pending)

    # -- public -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._pending == 0

    def poll(self) -> bool:
        """True once every request is DONE or FAILED (fails overdue ones first); never blocks."""
        if self._pending:
            self._expire()
        return self._pending == 0

    def statuses(self) -> list[RequestStatus]:
        self.poll()
        return list(self._status)

    def wait(self, timeout_s: float | None = None) -> list[TransferOutcome]:
        """Block until every request is DONE or FAILED; returns the outcomes.

        Returns by the latest request deadline at the latest. With ``timeout_s``, raises
        TransferTimeout if the batch is still running after that many seconds.
        """
        self._wait(timeout_s)
        return self.outcomes()

    def _wait(self, timeout_s: float | None) -> None:
        if self._pending == 0:
            return
        with self._lock:
            if self._event is None:
                self._event = threading.Event()
                if self._pending == 0:
                    self._event.set()
            event = self._event
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        while not event.is_set():
            until = self._next_deadline()
            if give_up is not None:
                until = min(until, give_up)
            event.wait(max(0.0, until - time.monotonic()))
            self._expire()
            if give_up is not None and not event.is_set() and time.monotonic() >= give_up:
                raise TransferTimeout(f"batch of {len(self)} requests", timeout_s=timeout_s or 0.0)

    def outcomes(self) -> list[TransferOutcome]:
        """The outcome of every request now (PENDING ones included)."""
        with self._lock:
            return [
                TransferOutcome(i, r, s, e)
                for i, (r, s, e) in enumerate(
                    zip(self.requests, self._status, self._errors, strict=True)
                )
            ]

    def failures(self) -> dict[int, TransferError]:
        """Index -> error of every failed request."""
        with self._lock:
            errors = self._errors
            if errors.count(None) == len(errors):  # none failed: a C loop, not a Python one
                return {}
            return {i: e for i, e in enumerate(errors) if e is not None}

    def raise_for_errors(self) -> None:
        """Raise BatchFailed naming each failed request; call after ``wait()``."""
        failures = self.failures()
        if failures:
            raise BatchFailed(failures, total=len(self))

    def add_done_callback(self, callback: Callable[[Batch], Any]) -> None:
        """Call ``callback(batch)`` once all requests finished (now, if they already have).

        It runs on whichever thread completes the last request: keep it short, never block.
        """
        with self._lock:
            if self._pending:
                self._callbacks.append(callback)
                return
        callback(self)
