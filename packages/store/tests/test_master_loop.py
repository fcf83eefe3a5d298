"""The master's busy-polling event loop: it serves as the plain loop does, and sleeps when idle."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from kvstack.store import MasterConfig
from kvstack.store._master import run_master_in_thread
from kvstack.store._wire import MasterConnection, Op

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for thread CPU time")


def _cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one thread of this process, from /proc."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_polling_master_serves_then_sleeps() -> None:
    master, stop = run_master_in_thread(MasterConfig(busy_poll_s=0.002))
    try:
        (thread,) = [t for t in threading.enumerate() if t.name == "kvstack-store-master"]
        assert thread.native_id is not None
        conn = MasterConnection(master.address)
        keys = [{"key": f"k{i}"} for i in range(3)]
        for _ in range(200):  # back-to-back requests: answered while it polls
            reply = conn.call(Op.EXISTS, {"items": keys}, timeout_s=10)
            assert reply == {"items": [{"ok": {"exists": False}}] * 3}
        conn.close()
        # Idle: polling stops after busy_poll_s, so a second of silence costs the master thread
        # next to no CPU (a loop that kept polling would burn most of that second).
        before = _cpu_seconds(thread.native_id)
        time.sleep(1.0)
        assert _cpu_seconds(thread.native_id) - before < 0.2
    finally:
        stop()
