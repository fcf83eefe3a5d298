"""Errors raised by kvstack.serve.

The hierarchy::

    ServeError                              base of every error raised here
    ├── ConfigError (ValueError)            a configuration field out of range
    ├── ModelError                          a model file or configuration we cannot use
    │   ├── ModelNotFound (FileNotFoundError)   the GGUF file is not where it should be
    │   └── UnsupportedModel (ValueError)   an architecture, tensor type or template we do not run
    ├── InvalidRequest (ValueError)         a request the engine refuses (HTTP 400 at the API)
    │   ├── PromptTooLong                   prompt plus max_tokens past the context length
    │   └── UnknownModel (LookupError)      a model name this server does not serve (HTTP 404)
    ├── EngineError (RuntimeError)          the engine cannot run a request it accepted
    │   ├── EngineStopped                   the engine loop is not running (closed or crashed)
    │   └── RequestTimeout (TimeoutError)   a request ran past its deadline (HTTP 504)
    ├── HandoffError                        a prefill → decode KV handoff failed (HTTP 502)
    │   └── KVLayoutMismatch                the two workers' KV layouts differ (HTTP 409 at prefill)
    ├── RouterError                         the router cannot place or finish a request
    │   ├── NoWorkerAvailable               every worker is unhealthy or its breaker is open (503)
    │   └── UpstreamError                   a worker refused, reset, 5xx'd or cut a stream (502)
    ├── ServerStartError                    a server child process that exited or never got ready
    └── BenchError                          a benchmark run that could not produce results

Every error keeps the inputs its message names as attributes and pickles.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "ConfigError",
    "EngineError",
    "EngineStopped",
    "HandoffError",
    "InvalidRequest",
    "KVLayoutMismatch",
    "ModelError",
    "ModelNotFound",
    "NoWorkerAvailable",
    "PromptTooLong",
    "RequestTimeout",
    "RouterError",
    "ServeError",
    "ServerStartError",
    "UnknownModel",
    "UnsupportedModel",
    "UpstreamError",
]


class ServeError(Exception):
    """Base of every error raised by kvstack.serve."""


class ConfigError(ServeError, ValueError):
    """A configuration field out of range; ``.field`` and ``.value`` name it."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, object, str]]:
        return (type(self), (self.field, self.value, self.reason))


class ModelError(ServeError):
    """A model file or configuration we cannot use."""


class ModelNotFound(ModelError, FileNotFoundError):
    """The GGUF file is missing; ``.path`` is where it was looked for."""

    def __init__(self, path: str, hint: str = "") -> None:
        super().__init__(f"model file {path!r} not found" + (f": {hint}" if hint else ""))
        self.path = path
        self.hint = hint

    def __reduce__(self) -> tuple[type[ModelNotFound], tuple[str, str]]:
        return (type(self), (self.path, self.hint))


class UnsupportedModel(ModelError, ValueError):
    """An architecture, tensor type or chat template this server does not run."""

    def __init__(self, what: str, value: object) -> None:
        super().__init__(f"unsupported {what}: {value!r}")
        self.what = what
        self.value = value

    def __reduce__(self) -> tuple[type[UnsupportedModel], tuple[str, object]]:
        return (type(self), (self.what, self.value))


class InvalidRequest(ServeError, ValueError):
    """A request the engine refuses; ``.param`` names the bad field (or None), ``.reason`` why."""

    def __init__(self, param: str | None, reason: str) -> None:
        super().__init__(f"{param}: {reason}" if param else reason)
        self.param = param
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidRequest], tuple[str | None, str]]:
        return (type(self), (self.param, self.reason))


class PromptTooLong(InvalidRequest):
    """Prompt tokens plus ``max_tokens`` exceed the model's context length."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            "prompt",
            f"prompt of {prompt_tokens} tokens plus max_tokens={max_tokens} exceeds the "
            f"context length of {context_length} tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length

    def __reduce__(self) -> tuple[type[PromptTooLong], tuple[int, int, int]]:  # pyrefly: ignore[bad-override]  # pickles with its own fields
        return (type(self), (self.prompt_tokens, self.max_tokens, self.context_length))


class UnknownModel(InvalidRequest, LookupError):
    """A model name this server does not serve; ``.served`` lists the names it does."""

    def __init__(self, model: str, served: tuple[str, ...]) -> None:
        super().__init__("model", f"model {model!r} is not served here (served: {list(served)})")
        self.model = model
        self.served = served

    def __reduce__(self) -> tuple[type[UnknownModel], tuple[str, tuple[str, ...]]]:  # pyrefly: ignore[bad-override]  # pickles with its own fields
        return (type(self), (self.model, self.served))


class EngineError(ServeError, RuntimeError):
    """The engine cannot run a request it accepted."""


class EngineStopped(EngineError):
    """The engine loop is not running; ``.reason`` says why (closed, or the error it died of)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"engine is not running: {reason}")
        self.reason = reason

    def __reduce__(self) -> tuple[type[EngineStopped], tuple[str]]:
        return (type(self), (self.reason,))


class RequestTimeout(EngineError, TimeoutError):
    """A request ran past its deadline; ``.request_id`` and ``.timeout_s`` name it."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"request {request_id!r} did not finish within {timeout_s} s")
        self.request_id = request_id
        self.timeout_s = timeout_s

    def __reduce__(self) -> tuple[type[RequestTimeout], tuple[str, float]]:
        return (type(self), (self.request_id, self.timeout_s))


class HandoffError(ServeError):
    """The KV handoff of request ``.request_id`` with prefill worker ``.peer`` failed."""

    def __init__(self, request_id: str, peer: str, reason: str) -> None:
        super().__init__(f"KV handoff of {request_id} with {peer} failed: {reason}")
        self.request_id = request_id
        self.peer = peer
        self.reason = reason

    def __reduce__(self) -> tuple[type[HandoffError], tuple[str, str, str]]:
        return (type(self), (self.request_id, self.peer, self.reason))


class KVLayoutMismatch(ServeError):
    """Two workers' KV caches differ in ``.field`` (ours ``.ours``, theirs ``.theirs``)."""

    def __init__(self, field: str, ours: object, theirs: object) -> None:
        super().__init__(
            f"KV layout mismatch in {field}: this worker has {ours!r}, the peer {theirs!r}; "
            "prefill and decode workers must run the same model, dtype and block size"
        )
        self.field = field
        self.ours = ours
        self.theirs = theirs

    def __reduce__(self) -> tuple[type[KVLayoutMismatch], tuple[str, object, object]]:
        return (type(self), (self.field, self.ours, self.theirs))


class RouterError(ServeError):
    """The router cannot place or finish a request."""


class NoWorkerAvailable(RouterError):
    """No worker can take a request; ``.num_workers`` is how many are configured."""

    def __init__(self, num_workers: int, reason: str) -> None:
        super().__init__(f"none of {num_workers} workers is available: {reason}")
        self.num_workers = num_workers
        self.reason = reason

    def __reduce__(self) -> tuple[type[NoWorkerAvailable], tuple[int, str]]:
        return (type(self), (self.num_workers, self.reason))


class UpstreamError(RouterError):
    """Worker ``.worker`` failed a request; ``.reason`` says how (refused, reset, 5xx, cut off)."""

    def __init__(self, worker: str, reason: str) -> None:
        super().__init__(f"worker {worker} failed: {reason}")
        self.worker = worker
        self.reason = reason

    def __reduce__(self) -> tuple[type[UpstreamError], tuple[str, str]]:
        return (type(self), (self.worker, self.reason))


class ServerStartError(ServeError):
    """The server child exited or stayed silent past its deadline; ``.stderr_tail`` says why."""

    def __init__(self, reason: str, stderr_tail: str) -> None:
        super().__init__(f"server did not start: {reason}\n{stderr_tail}")
        self.reason = reason
        self.stderr_tail = stderr_tail

    def __reduce__(self) -> tuple[type[ServerStartError], tuple[str, str]]:
        return (type(self), (self.reason, self.stderr_tail))


class BenchError(ServeError):
    """A benchmark run that could not produce results; ``.reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[BenchError], tuple[str]]:
        return (type(self), (self.reason,))
