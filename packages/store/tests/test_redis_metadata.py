"""Many hosts: the segment metadata lives in a real Redis instead of the master's HTTP table."""

from __future__ import annotations

import numpy as np
import redis

from kvstack.store import PutOptions

from .conftest import SHARED_HEARTBEAT_TIMEOUT_S, Cluster


def test_store_over_redis_segment_metadata(make_cluster: Cluster, redis_url: str) -> None:
    make_cluster.start_master(
        "--metadata-url", redis_url, heartbeat_timeout_s=SHARED_HEARTBEAT_TIMEOUT_S
    )
    make_cluster.start_node("r0", "16MiB", "--disk", str(make_cluster.tmp / "disk"))
    make_cluster.start_node("r1", "16MiB")
    client = make_cluster.client()
    assert client.metadata_url == redis_url
    value = np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    client.put("over/redis", value, options=PutOptions(replicas=2))
    assert make_cluster.client().get("over/redis") == value
    keys = redis.Redis.from_url(redis_url).keys("kvstack:transfer:segment:kvs-r*")
    assert len(keys) == 2  # one segment per node, published by the nodes themselves
