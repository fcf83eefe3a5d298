"""Fixtures: a real master and real node processes on 127.0.0.1, killed after use."""

from __future__ import annotations

import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstack.store import ClientConfig, StoreClient
from tools.testing.redis_server import redis_server

START_TIMEOUT_S = 60.0
# Failure tests wait for deaths, so keep it short; a false death on CI's two shared cores
# is survivable there (the node re-registers), while the shared cluster uses a long timeout.
HEARTBEAT_TIMEOUT_S = 3.0
SHARED_HEARTBEAT_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_line(proc: subprocess.Popen[str], timeout_s: float = START_TIMEOUT_S) -> str:
    stdout = proc.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise TimeoutError(f"no line from {proc.args} within {timeout_s} s")
    return stdout.readline()


class Cluster:
    """A master and nodes, each its own `python -m kvstack.store` process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.master: subprocess.Popen[str] | None = None
        self.master_args: list[str] = []
        self.address = ""
        self.nodes: dict[str, subprocess.Popen[str]] = {}
        self.clients: list[StoreClient] = []

    def start_master(
        self, *extra: str, port: int = 0, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S
    ) -> str:
        self.master_args = [
            "--heartbeat-timeout",
            str(heartbeat_timeout_s),
            "--metadata-port",
            str(free_port()),
            *extra,
        ]
        return self._spawn_master(port)

    def _spawn_master(self, port: int) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstack.store", "--log-level", "WARNING", "master",
             "--port", str(port), *self.master_args],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.master = proc
        line = read_line(proc)
        assert "listening on " in line, line
        self.address = line.split("listening on ", 1)[1].split()[0]
        return self.address

    def restart_master(self) -> None:
        """kill -9 the master, then start it again on the same ports and data directory."""
        assert self.master is not None
        self.master.send_signal(signal.SIGKILL)
        self.master.wait(timeout=30)
        self._spawn_master(int(self.address.rsplit(":", 1)[1]))

    def start_node(self, name: str, memory: str = "32MiB", *extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstack.store", "--log-level", "WARNING", "node",
             "--master", self.address, "--memory", memory, "--name", name,
             "--poll-interval", "0.2", *extra],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.nodes[name] = proc
        line = read_line(proc)
        assert "registered" in line, line
        return proc

    def kill_node(self, name: str) -> None:
        proc = self.nodes.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def client(self, **kwargs: object) -> StoreClient:
        client = StoreClient(ClientConfig(master=self.address, **kwargs))  # pyrefly: ignore[bad-argument-type] -- test helper forwards typed fields
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for proc in [*self.nodes.values(), self.master]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A master and three 96 MiB nodes shared by a module's tests."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_master(heartbeat_timeout_s=SHARED_HEARTBEAT_TIMEOUT_S)
        for i in range(3):
            cluster.start_node(f"n{i}", "96MiB")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> StoreClient:
    return cluster.client()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free port, killed after the session."""
    with redis_server(timeout_s=START_TIMEOUT_S) as url:
        yield url
