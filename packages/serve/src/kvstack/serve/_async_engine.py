"""Drives an ``LLMEngine`` on its own thread and streams its outputs to asyncio callers.

The engine thread owns the engine; callers talk to it through a command list guarded by a
condition variable, and outputs come back with ``loop.call_soon_threadsafe``. Torch releases the
GIL inside its kernels, so the HTTP loop keeps serving while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from kvstack.serve._engine import EngineStats, LLMEngine
from kvstack.serve._metrics import ServeMetrics
from kvstack.serve._request import RequestOutput
from kvstack.serve._sampling import SamplingParams
from kvstack.serve.errors import EngineStopped, ServeError

__all__ = ["AsyncEngine"]

logger = logging.getLogger(__name__)

# How long an idle engine thread sleeps on its condition before rechecking for shutdown; any
# command or close() wakes it at once, so this bounds only a lost wake-up.
_IDLE_WAIT_S = 1.0


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    hold_blocks: bool = False


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Reserve:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[int]]


@dataclass(frozen=True, slots=True)
class _Activate:
    request_id: str
    first_token: int


_Command = _Add | _Abort | _Reserve | _Activate


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    arrival_s: float
    last_token_s: float | None = None


class AsyncEngine:
    """The asyncio face of the engine: ``generate()`` streams ``RequestOutput`` objects."""

    def __init__(self, engine: LLMEngine, *, metrics: ServeMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._cv = threading.Condition()
        self._commands: list[_Command] = []
        self._reservations: list[_Reserve] = []  # waiting for free blocks, in arrival order
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopping = False
        self._dead: str | None = None
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="kvstack-serve-engine", daemon=True)

    @property
    def stats(self) -> EngineStats:
        """Engine state as of the end of the last loop iteration."""
        return self._stats

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive() and self._dead is None

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def close(self, *, timeout_s: float = 30.0) -> None:
        """Stop the thread (pending requests end with EngineStopped) and join it."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.1f s", timeout_s)

    def _submit(self, command: _Command) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Ask the engine to drop a request and free its blocks (thread-safe, idempotent)."""
        self._submit(_Abort(request_id))

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidRequest/PromptTooLong now, before a response starts streaming."""
        self.engine.validate(prompt_token_ids, params)

    def release_held(self, request_id: str) -> None:
        """Free the blocks of a finished ``hold_blocks`` request (same as ``abort``)."""
        self._submit(_Abort(request_id))

    async def reserve(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[int]:
        """Decode side of a PD handoff: blocks for the prompt's KV, once enough are free.

        Cancelling the wait (or failing later) must be followed by ``abort(request_id)``.
        """
        if self._dead is not None or self._stopping:
            raise EngineStopped(self._dead or "closed")
        self.validate(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._submit(_Reserve(request_id, list(prompt_token_ids), params, loop, future))
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        hold_blocks: bool = False,
        first_token: int | None = None,
    ) -> AsyncGenerator[RequestOutput]:
        """Outputs of one request as the engine produces them; the last has ``finished``.

        ``first_token`` activates a request ``reserve`` prepared (its prompt KV has landed);
        ``hold_blocks`` keeps a finished request's blocks until ``release_held``.
        Leaving the iteration early (a client disconnect, a cancelled task) aborts the request.
        Raises EngineStopped when the engine is closed or dies, InvalidRequest for bad input.
        """
        if self._dead is not None or self._stopping:
            raise EngineStopped(self._dead or "closed")
        if first_token is None:
            self.validate(prompt_token_ids, params)
        stream = _Stream(
            loop=asyncio.get_running_loop(), queue=asyncio.Queue(), arrival_s=time.monotonic()
        )
        with self._streams_lock:
            self._streams[request_id] = stream
        if first_token is None:
            self._submit(_Add(request_id, list(prompt_token_ids), params, hold_blocks))
        else:
            self._submit(_Activate(request_id, first_token))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    # ---- the engine thread ---------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return  # the caller left; its abort is on the way
        if isinstance(item, RequestOutput) and self.metrics is not None:
            now = time.monotonic()
            first = stream.last_token_s is None
            since = stream.arrival_s if stream.last_token_s is None else stream.last_token_s
            for _ in item.new_token_ids:
                self.metrics.observe_token(first=first, seconds=now - since)
            stream.last_token_s = now
            if item.finished:
                self.metrics.observe_finished(
                    reason=str(item.finish_reason),
                    prompt_tokens=item.prompt_tokens,
                    e2e_s=now - stream.arrival_s,
                )
        # RuntimeError: the caller's loop is closed, nobody is listening
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Abort):
            self._reservations = [
                r for r in self._reservations if r.request_id != command.request_id
            ]
            if self.engine.abort(command.request_id) and self.metrics is not None:
                self.metrics.observe_aborted()
            return
        if isinstance(command, _Reserve):
            self._reservations.append(command)
            return
        try:
            if isinstance(command, _Activate):
                output = self.engine.activate(command.request_id, command.first_token)
                self._deliver(command.request_id, output)
            else:
                self.engine.add_request(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    hold_blocks=command.hold_blocks,
                )
        except ServeError as exc:
            self._deliver(command.request_id, exc)

    def _grant_reservations(self) -> None:
        # In arrival order: a later small one never overtakes an earlier big one forever.
        while self._reservations:
            command = self._reservations[0]
            if command.future.done():  # the caller gave up; its abort is on the way
                self._reservations.pop(0)
                continue
            try:
                blocks = self.engine.reserve(
                    command.request_id, command.prompt_token_ids, command.params
                )
            except ServeError as exc:
                self._reservations.pop(0)
                _resolve(command, exc)
                continue
            if blocks is None:
                return
            self._reservations.pop(0)
            _resolve(command, blocks)

    def _shut_down(self, commands: list[_Command]) -> None:
        # Requests still queued or running end here, so every block goes back to the pool.
        for command in commands:
            if isinstance(command, _Abort):
                self._apply(command)
        for command in (*self._reservations, *commands):
            if isinstance(command, _Reserve):
                _resolve(command, EngineStopped("closed"))
        self._reservations = []
        for request_id in self.engine.request_ids():
            self.engine.abort(request_id)
        self._stats = self.engine.stats()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    # A stalled engine (blocks held by handoffs) waits for a command too.
                    while not (
                        self._commands
                        or (self.engine.has_unfinished() and not self.engine.stalled)
                        or self._stopping
                    ):
                        self._cv.wait(_IDLE_WAIT_S)
                    commands: list[_Command] = self._commands
                    self._commands = []
                if self._stopping:
                    self._shut_down(commands)
                    break
                for command in commands:
                    self._apply(command)
                self._grant_reservations()
                outputs = self.engine.step() if self.engine.has_unfinished() else []
                # Stats first, so a caller that sees an output sees state at least this new.
                self._stats = self.engine.stats()
                if self.metrics is not None:
                    self.metrics.update(self._stats)
                for output in outputs:
                    self._deliver(output.request_id, output)
            reason = "closed"
        except Exception as exc:  # the engine died: every waiting caller must hear of it
            logger.exception("engine thread died")
            reason = f"{type(exc).__name__}: {exc}"
        self._dead = reason
        for command in self._reservations:
            _resolve(command, EngineStopped(reason))
        with self._streams_lock:
            pending = list(self._streams)
        for request_id in pending:
            self._deliver(request_id, EngineStopped(reason))


def _resolve(command: _Reserve, result: list[int] | BaseException) -> None:
    """Complete a reservation's future from the engine thread (unless its caller gave up)."""

    def settle() -> None:
        if command.future.done():
            return  # cancelled after the grant: the caller's abort frees the blocks
        if isinstance(result, BaseException):
            command.future.set_exception(result)
        else:
            command.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed
        command.loop.call_soon_threadsafe(settle)
