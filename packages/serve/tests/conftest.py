"""Shared fixtures: the models (loaded once per session) and a real tiny-model server process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvstack.serve import LoadedModel, ServerProcess, load_model, load_tiny

# Small enough that a few long requests fill it, so tests reach eviction and preemption.
TINY_SERVER_BLOCKS = 256  # test_server.py checks /health against this number


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread for our modules, restored after (other packages share the process).

    The CI box has 2 cores shared with other jobs, where OpenMP's spinning barriers make 2
    threads about 10x slower than 1 (see kvstack.serve._env.torch_threads).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_tiny()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[ServerProcess]:
    args = ["--model", "tiny", "--port", "0", "--num-blocks", str(TINY_SERVER_BLOCKS)]
    with ServerProcess.start(args, ready_timeout_s=120) as server:
        yield server
