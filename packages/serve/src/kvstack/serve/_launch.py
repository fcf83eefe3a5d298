"""Start ``kvstack-serve up`` as a child process and wait, with a deadline, until it listens.

The child prints one JSON line on stdout when ready: ``{"event": "ready", "url": ...}``; its logs
go to stderr. Used by ``bench`` and ``demo`` when no ``--base-url`` is given, and by the tests.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kvstack.serve.errors import ServerStartError

__all__ = ["READY_EVENT", "ServerProcess"]

logger = logging.getLogger(__name__)

READY_EVENT = "ready"


class ServerProcess:
    """A running ``python -m kvstack.serve up`` child; ``url`` is its base URL."""

    def __init__(
        self,
        proc: subprocess.Popen[str],
        url: str,
        stderr_lines: list[str],
        ready: dict[str, Any] | None = None,
    ) -> None:
        self.proc = proc
        self.url = url
        self._stderr_lines = stderr_lines
        self.ready = ready or {}  # the child's ready line (``up --workers N`` lists its workers)

    @classmethod
    def start(
        cls,
        up_args: Sequence[str],
        *,
        ready_timeout_s: float = 180.0,
        echo_stderr: bool = False,
        command: str = "up",
    ) -> ServerProcess:
        """Run ``command`` (``up`` or ``router``) with ``up_args`` (add ``--port 0`` for a free
        port) and wait until it prints its ready line."""
        argv = [sys.executable, "-m", "kvstack.serve", command, *up_args]
        logger.info("starting server: %s", " ".join(argv))
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        lines: queue.Queue[str | None] = queue.Queue()
        stderr_lines: list[str] = []

        def pump_stdout() -> None:
            for line in proc.stdout or ():
                lines.put(line)
            lines.put(None)

        def pump_stderr() -> None:
            for line in proc.stderr or ():
                stderr_lines.append(line)
                del stderr_lines[:-200]  # keep the tail only
                if echo_stderr:
                    sys.stderr.write(line)

        threading.Thread(target=pump_stdout, name="kvstack-serve-child-stdout", daemon=True).start()
        threading.Thread(target=pump_stderr, name="kvstack-serve-child-stderr", daemon=True).start()
        deadline = time.monotonic() + ready_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cls._kill(proc)
                raise ServerStartError(
                    f"not ready within {ready_timeout_s} s", "".join(stderr_lines[-20:])
                )
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = proc.wait(timeout=10)
                raise ServerStartError(f"exited with code {code}", "".join(stderr_lines[-20:]))
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == READY_EVENT:
                return cls(proc, str(event["url"]), stderr_lines, event)

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        proc.kill()
        proc.wait(timeout=30)

    def stderr_tail(self, lines: int = 20) -> str:
        """The child's last log lines."""
        return "".join(self._stderr_lines[-lines:])

    def stop(self, *, timeout_s: float = 30.0) -> int:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "server %s ignored SIGTERM for %.0f s; killing it", self.url, timeout_s
                )
                self._kill(self.proc)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
