"""The OpenAI-compatible HTTP API over an ``AsyncEngine`` (FastAPI on uvicorn, one loop).

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (streaming SSE and not), ``/v1/models``,
``/health``, ``/metrics``. Every failure answers OpenAI's error object with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pydantic
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstack.serve._async_engine import AsyncEngine
from kvstack.serve._config import EngineConfig, ServerConfig
from kvstack.serve._disagg import (
    PREFILL_HEADER,
    TIMINGS_HEADER,
    DecodeHandoff,
    HandoffTimings,
    KVSpace,
    PrefillService,
    WorkerMode,
)
from kvstack.serve._engine import LLMEngine, kv_cache_size
from kvstack.serve._loader import LoadedModel
from kvstack.serve._metrics import ServeMetrics
from kvstack.serve._protocol import ChatCompletionRequest, CompletionRequest, error_body
from kvstack.serve._request import RequestOutput
from kvstack.serve._sampling import SamplingParams
from kvstack.serve.errors import (
    EngineStopped,
    HandoffError,
    InvalidRequest,
    KVLayoutMismatch,
    RequestTimeout,
    ServeError,
    UnknownModel,
)
from kvstack.store import ClientConfig, StoreClient
from kvstack.transfer import EngineConfig as EngineConfigT

__all__ = ["ServerState", "bind_socket", "build_state", "create_app", "run_server"]

logger = logging.getLogger(__name__)


def _error(
    status: int, message: str, *, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind=kind, param=param, code=code), status_code=status)


def _error_for(exc: ServeError) -> JSONResponse:
    if isinstance(exc, UnknownModel):
        return _error(
            404, str(exc), kind="invalid_request_error", param="model", code="model_not_found"
        )
    if isinstance(exc, InvalidRequest):
        code = (
            "context_length_exceeded"
            if exc.param == "prompt" and "context length" in exc.reason
            else None
        )
        return _error(400, str(exc), kind="invalid_request_error", param=exc.param, code=code)
    if isinstance(exc, RequestTimeout):
        return _error(504, str(exc), kind="server_error", code="timeout")
    if isinstance(exc, EngineStopped):
        return _error(503, str(exc), kind="server_error", code="engine_stopped")
    if isinstance(exc, KVLayoutMismatch):
        return _error(409, str(exc), kind="invalid_request_error", code="kv_layout_mismatch")
    if isinstance(exc, HandoffError):
        return _error(502, str(exc), kind="server_error", code="kv_handoff_failed")
    return _error(500, str(exc), kind="server_error")


class ServerState:
    """What the routes share: the engine, the model's text side, metrics, limits."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: AsyncEngine,
        metrics: ServeMetrics,
        *,
        served_model_name: str,
        request_timeout_s: float,
        mode: WorkerMode = WorkerMode.COLOCATED,
        prefill: PrefillService | None = None,
        handoff: DecodeHandoff | None = None,
    ) -> None:
        self.loaded = loaded
        self.mode = mode
        self.prefill = prefill
        self.handoff = handoff
        self.engine = engine
        self.metrics = metrics
        self.model_name = served_model_name
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        device = engine.engine.device
        self.gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        # Tokenizing a long prompt takes milliseconds: keep it off the event loop.
        self.tokenize_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvstack-serve-tokenize"
        )

    def check_model(self, model: str) -> None:
        """Raise UnknownModel unless ``model`` is ours."""
        if model != self.model_name:
            raise UnknownModel(model, (self.model_name,))

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (on the tokenizer thread)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenize_pool, self.loaded.tokenizer.encode, text)

    async def remote_prefill(
        self, request: Request, request_id: str, ids: list[int], params: SamplingParams
    ) -> tuple[int | None, HandoffTimings | None]:
        """Decode mode: the first token and timings of the handoff the router asked for."""
        if self.handoff is None:
            return None, None
        prefill_url = request.headers.get(PREFILL_HEADER)
        if not prefill_url:
            raise InvalidRequest(
                None, f"a decode worker needs the {PREFILL_HEADER} header (use the router)"
            )
        trace_id = request.headers.get("x-kvstack-trace-id", request_id)
        return await self.handoff.prefill(prefill_url, request_id, ids, params, trace_id=trace_id)


async def _parse(request: Request, model_type: type[pydantic.BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(None, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(None, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_type.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(param, f"{first['msg']} (got {first.get('input')!r:.80})") from exc


def _usage(out: RequestOutput, timings: HandoffTimings | None) -> dict[str, Any]:
    # After a handoff the prefill worker's cache hits are the ones that count.
    cached = out.cached_tokens if timings is None else timings.cached_tokens
    from_store = out.store_cached_tokens if timings is None else timings.store_cached_tokens
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached, "store_cached_tokens": from_store},
    }


def _timing_headers(timings: HandoffTimings | None) -> dict[str, str]:
    return {TIMINGS_HEADER: timings.header()} if timings is not None else {}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the client going away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect_unless_disconnected(
    request: Request,
    state: ServerState,
    request_id: str,
    ids: list[int],
    params: SamplingParams,
    *,
    first_token: int | None,
) -> tuple[str, RequestOutput] | None:
    """The whole output, or None when the client left first (the request is then aborted)."""
    collect = asyncio.create_task(_collect(state, request_id, ids, params, first_token))
    watch = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        collect.cancel()
        watch.cancel()
        # A task cancelled before it ran never reached generate(): a handed-off request would
        # keep its reserved blocks. Aborting is idempotent.
        state.engine.abort(request_id)
        raise
    watch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch
    if collect.done():
        return collect.result()  # raises what the request failed with
    # Cancelling closes generate(), which aborts the request and frees its blocks.
    collect.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collect
    logger.info("client left before request %s finished; aborted", request_id)
    return None


async def _collect(
    state: ServerState,
    request_id: str,
    ids: list[int],
    params: SamplingParams,
    first_token: int | None,
) -> tuple[str, RequestOutput]:
    text = []
    last: RequestOutput | None = None
    try:
        async with asyncio.timeout(state.request_timeout_s):
            generated = state.engine.generate(request_id, ids, params, first_token=first_token)
            async for out in generated:
                text.append(out.text)
                last = out
    except TimeoutError as exc:
        raise RequestTimeout(request_id, state.request_timeout_s) from exc
    if last is None:
        raise EngineStopped(f"request {request_id} ended without output")
    return "".join(text), last


def create_app(
    state: ServerState, *, on_startup: Callable[[], Awaitable[None]] | None = None
) -> FastAPI:
    """The FastAPI application over ``state``; ``on_startup`` runs once before serving."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncGenerator[None]:
        if on_startup is not None:
            await on_startup()
        yield

    app = FastAPI(
        title="kvstack-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, exc: ServeError) -> JSONResponse:
        return _error_for(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail, kind="invalid_request_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = state.engine.stats
        body = {
            "status": "ok" if state.engine.alive else "engine stopped",
            "model": state.model_name,
            "num_requests_running": stats.num_running,
            "num_requests_waiting": stats.num_waiting,
            "kv_blocks_total": stats.kv.num_blocks,
            "kv_blocks_free": stats.kv.num_free_blocks,
            "kv_blocks_cached": stats.kv.num_cached_blocks,
            "mode": state.mode.value,
            "num_requests_transferring": stats.num_transferring,
            "num_prefills_held": stats.num_held,
        }
        return JSONResponse(body, status_code=200 if state.engine.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        store = state.engine.engine.store
        if store is not None:
            state.metrics.update_store(store.stats())
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "kvstack",
            "max_model_len": state.engine.engine.max_model_len,
            # kvstack extensions, read by benchmark clients
            "vocab_size": state.engine.engine.model.config.vocab_size,
            "gpu": state.gpu_name,
            "mode": state.mode.value,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/kv/prefill")
    async def kv_prefill(request: Request) -> JSONResponse:
        # Internal: a decode worker's handshake (see _disagg.py).
        if state.prefill is None:
            raise InvalidRequest(None, f"this worker runs in {state.mode.value} mode, not prefill")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(None, f"handshake is not valid JSON: {exc}") from exc
        return JSONResponse(await state.prefill.handle(body))

    @app.post("/kv/abort")
    async def kv_abort(request: Request) -> JSONResponse:
        # Internal: a decode worker gave up; answers once no byte of the handoff can land.
        if state.prefill is None:
            raise InvalidRequest(None, f"this worker runs in {state.mode.value} mode, not prefill")
        try:
            request_id = json.loads(await request.body())["request_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest("request_id", 'expected {"request_id": ...}') from exc
        return JSONResponse({"aborted": await state.prefill.abort(str(request_id))})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        state.check_model(body.model)
        params = body.sampling_params(body.max_tokens)
        prompt = body.prompt_value()
        ids = await state.encode(prompt) if isinstance(prompt, str) else list(prompt)
        state.engine.validate(ids, params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        first_token, timings = await state.remote_prefill(request, request_id, ids, params)
        base = {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
        }
        if not body.stream:
            collected = await _collect_unless_disconnected(
                request, state, request_id, ids, params, first_token=first_token
            )
            if collected is None:
                return Response(status_code=499)  # nobody reads it; nginx's "client closed"
            text, last = collected
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": str(last.finish_reason),
            }
            return JSONResponse(
                {**base, "choices": [choice], "usage": _usage(last, timings)},
                headers=_timing_headers(timings),
            )

        def chunk(out: RequestOutput) -> dict[str, Any]:
            reason = str(out.finish_reason) if out.finished else None
            return {
                **base,
                "choices": [
                    {"index": 0, "text": out.text, "logprobs": None, "finish_reason": reason}
                ],
            }

        return _stream_response(
            state,
            request_id,
            await _outputs(state, request_id, ids, params, first_token),
            chunk=chunk,
            base=base,
            include_usage=body.include_usage,
            timings=timings,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        state.check_model(body.model)
        params = body.sampling_params(body.requested_max_tokens)
        prompt = state.loaded.chat_template.render(body.chat_messages())
        ids = await state.encode(prompt)
        state.engine.validate(ids, params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        first_token, timings = await state.remote_prefill(request, request_id, ids, params)
        base = {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model_name,
        }
        if not body.stream:
            collected = await _collect_unless_disconnected(
                request, state, request_id, ids, params, first_token=first_token
            )
            if collected is None:
                return Response(status_code=499)  # nobody reads it; nginx's "client closed"
            text, last = collected
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": str(last.finish_reason),
            }
            return JSONResponse(
                {**base, "choices": [choice], "usage": _usage(last, timings)},
                headers=_timing_headers(timings),
            )
        chunk_base = {**base, "object": "chat.completion.chunk"}
        first = True

        def chunk(out: RequestOutput) -> dict[str, Any]:
            nonlocal first
            delta: dict[str, Any] = {"content": out.text}
            if first:
                delta["role"] = "assistant"
                first = False
            reason = str(out.finish_reason) if out.finished else None
            return {
                **chunk_base,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                ],
            }

        return _stream_response(
            state,
            request_id,
            await _outputs(state, request_id, ids, params, first_token),
            chunk=chunk,
            base=chunk_base,
            include_usage=body.include_usage,
            timings=timings,
        )

    return app


async def _outputs(
    state: ServerState,
    request_id: str,
    ids: list[int],
    params: SamplingParams,
    first_token: int | None,
) -> AsyncGenerator[RequestOutput]:
    """The request's outputs; after a handoff, already activated (its first output in hand).

    Activating before the response starts means a response that never streams still ends the
    request: the started generator is closed when collected, and closing it aborts.
    """
    generated = state.engine.generate(request_id, ids, params, first_token=first_token)
    if first_token is None:
        return generated
    first = await anext(generated)

    async def chained() -> AsyncGenerator[RequestOutput]:
        try:
            yield first
            async for out in generated:
                yield out
        finally:
            await generated.aclose()

    return chained()


def _stream_response(
    state: ServerState,
    request_id: str,
    outputs: AsyncGenerator[RequestOutput],
    *,
    chunk: Callable[[RequestOutput], dict[str, Any]],
    base: dict[str, Any],
    include_usage: bool,
    timings: HandoffTimings | None,
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        # A client that disconnects cancels this generator; generate() then aborts the request
        # and its blocks go back to the pool (issue 6: a client that disconnects frees its blocks).
        last: RequestOutput | None = None
        try:
            async with asyncio.timeout(state.request_timeout_s):
                async for out in outputs:
                    last = out
                    if out.text or out.finished:
                        yield _sse(chunk(out))
        except TimeoutError:
            timeout = RequestTimeout(request_id, state.request_timeout_s)
            yield _sse(error_body(str(timeout), kind="server_error", param=None, code="timeout"))
            return
        except ServeError as exc:
            yield _sse(error_body(str(exc), kind="server_error", param=None, code=None))
            return
        if include_usage and last is not None:
            yield _sse({**base, "choices": [], "usage": _usage(last, timings)})
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", **_timing_headers(timings)}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free one (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only when
    # their proto says TCP. Without it, Nagle plus the peer's delayed ACK held every response on
    # a reused connection ~40 ms (measured: 44 ms vs 2.7 ms p50 for GET /v1/models, issue 7).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


async def run_server(
    loaded: LoadedModel,
    *,
    engine_config: EngineConfig,
    server_config: ServerConfig,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until cancelled or signalled (SIGINT/SIGTERM); ``on_ready(url)`` once listening."""
    sock = bind_socket(server_config.host, server_config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    with contextlib.ExitStack() as resources:
        state = build_state(loaded, engine_config, server_config, resources)
        await _serve(state, sock, url, on_ready)


def build_state(
    loaded: LoadedModel,
    engine_config: EngineConfig,
    server_config: ServerConfig,
    resources: contextlib.ExitStack,
) -> ServerState:
    """The engine and, by mode, its KV memory, store client and handoff side; ``resources``
    closes them (the caller starts the engine thread)."""
    name = server_config.served_model_name or loaded.name
    metrics = ServeMetrics(name)
    mode = WorkerMode(server_config.mode)
    space: KVSpace | None = None
    if mode is not WorkerMode.COLOCATED:
        num_blocks, block_nbytes = kv_cache_size(loaded, engine_config)
        metadata_url = server_config.transfer_metadata_url or EngineConfigT().metadata_url
        space = KVSpace.create(
            metadata_url,
            nbytes=num_blocks * block_nbytes,
            device=torch.device(engine_config.device),
        )
        resources.callback(space.close)
    store: StoreClient | None = None
    if server_config.store_master is not None:
        store = StoreClient(ClientConfig(master=server_config.store_master))
        resources.callback(store.close)
    llm = LLMEngine(loaded, engine_config, kv_memory=space.memory if space else None, store=store)
    resources.callback(llm.close)
    engine = AsyncEngine(llm, metrics=metrics)
    resources.callback(engine.close)
    prefill = handoff = None
    if space is not None and mode is WorkerMode.PREFILL:
        prefill = PrefillService(engine, space, push_timeout_s=server_config.push_timeout_s)
        resources.callback(prefill.close)
    elif space is not None:
        handoff = DecodeHandoff(
            engine,
            space,
            timeout_s=server_config.handoff_timeout_s,
            push_timeout_s=server_config.push_timeout_s,
        )
    return ServerState(
        loaded,
        engine,
        metrics,
        served_model_name=name,
        request_timeout_s=server_config.request_timeout_s,
        mode=mode,
        prefill=prefill,
        handoff=handoff,
    )


async def _serve(
    state: ServerState,
    sock: socket.socket,
    url: str,
    on_ready: Callable[[str], Awaitable[None] | None] | None,
) -> None:
    name = state.model_name
    engine = state.engine

    async def announce() -> None:
        # Runs at lifespan startup, just before uvicorn accepts on the socket; it already
        # listens, so a client that connects at once waits in its backlog.
        logger.info("serving %s at %s", name, url)
        if on_ready is not None:
            result = on_ready(url)
            if result is not None:
                await result

    app = create_app(state, on_startup=announce)
    # httptools: uvicorn's C parser, not h11 (less CPU per request; issue 7, benchmark 4).
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, http="httptools"
    )
    server = uvicorn.Server(config)
    engine.start()
    try:
        await server.serve(sockets=[sock])
    finally:
        if state.handoff is not None:
            await state.handoff.close()
        engine.close()
        state.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        sock.close()
        logger.info("server at %s stopped", url)
