"""Errors keep their fields, pickle (they cross process boundaries), and name the bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from kvstack.serve import (
    BenchError,
    ConfigError,
    EngineStopped,
    InvalidRequest,
    ModelNotFound,
    NoWorkerAvailable,
    PromptTooLong,
    RequestTimeout,
    ServerProcess,
    ServerStartError,
    UnknownModel,
    UnsupportedModel,
    UpstreamError,
)

ERRORS = [
    ConfigError("block_size", 0, "must be a positive integer"),
    ModelNotFound("/models/x.gguf", "install it"),
    UnsupportedModel("architecture", "mamba"),
    InvalidRequest("top_p", "must be in (0, 1]"),
    PromptTooLong(2000, 16, 1024),
    UnknownModel("gpt-4", ("tiny",)),
    EngineStopped("closed"),
    RequestTimeout("cmpl-1", 5.0),
    ServerStartError("exited with code 2", "Traceback ..."),
    BenchError("the dataset is empty"),
    NoWorkerAvailable(2, "every circuit breaker is open"),
    UpstreamError("http://127.0.0.1:8001", "HTTP 503: engine stopped"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_fields(error: Exception) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert vars(clone) == vars(error)


def test_builtin_bases_where_callers_expect_them() -> None:
    assert isinstance(ModelNotFound("x"), FileNotFoundError)
    assert isinstance(PromptTooLong(1, 1, 1), ValueError)
    assert isinstance(UnknownModel("x", ()), LookupError)
    assert isinstance(RequestTimeout("x", 1.0), TimeoutError)


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ServerStartError, match="exited with code 2") as caught:
        ServerProcess.start(["--model", str(missing), "--port", "0"], ready_timeout_s=120)
    assert "missing.gguf" in caught.value.stderr_tail
