"""The engine's completion metrics: records queued by batches, added up by a scrape."""

from __future__ import annotations

import threading
import uuid

import pytest
from prometheus_client import REGISTRY, generate_latest

from kvstack.transfer import _metrics


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def peer() -> str:
    return f"127.0.0.1:{uuid.uuid4().hex[:6]}"  # labels of this test only


def test_scrape_adds_up_bytes_requests_and_latency_buckets(peer: str) -> None:
    for seconds in (5e-6, 1e-5, 2e-4, 0.5, 20.0):  # 1e-5: on a bound, counted in its bucket
        _metrics.record_done("shm", peer, "write", count=3, length=4096, seconds=seconds)
    _metrics.record_done("shm", peer, "read", count=1, length=7, seconds=1e-3)
    write = {"transport": "shm", "peer": peer, "op": "write"}
    assert _sample("kvstack_transfer_bytes_total", write) == 5 * 4096
    assert _sample("kvstack_transfer_requests_total", write) == 15
    read = {**write, "op": "read"}
    assert _sample("kvstack_transfer_bytes_total", read) == 7
    pair = {"transport": "shm", "peer": peer}
    buckets = {
        le: _sample("kvstack_transfer_batch_seconds_bucket", {**pair, "le": le})
        for le in ("1e-05", "0.0001", "0.001", "1.0", "10.0", "+Inf")
    }
    assert buckets == {"1e-05": 2, "0.0001": 2, "0.001": 4, "1.0": 5, "10.0": 5, "+Inf": 6}
    assert _sample("kvstack_transfer_batch_seconds_count", pair) == 6
    assert _sample("kvstack_transfer_batch_seconds_sum", pair) == pytest.approx(20.501215)
    text = generate_latest().decode()
    assert f'kvstack_transfer_requests_total{{op="read",peer="{peer}",transport="shm"}} 1.0' in text


def test_records_from_many_threads_are_all_counted_and_the_queue_stays_bounded(
    peer: str,
) -> None:
    def record() -> None:
        for _ in range(3000):
            _metrics.record_done("tcp", peer, "write", count=2, length=10, seconds=1e-4)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(_metrics._COMPLETED.queue) <= _metrics._QUEUE_MAX + len(threads)
    labels = {"transport": "tcp", "peer": peer, "op": "write"}
    assert _sample("kvstack_transfer_requests_total", labels) == 4 * 3000 * 2
    assert _sample("kvstack_transfer_bytes_total", labels) == 4 * 3000 * 10
