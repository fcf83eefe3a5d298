"""Configs refuse bad values with the field name and the value in the message."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvstack.store import (
    ClientConfig,
    ConfigError,
    MasterConfig,
    NodeConfig,
    PutOptions,
    parse_size,
)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MasterConfig(port=70000), "MasterConfig.port must be 0..65535, got 70000"),
        (lambda: MasterConfig(lease_s=0), "MasterConfig.lease_s must be a positive number"),
        (
            lambda: MasterConfig(low_watermark=0.9, high_watermark=0.5),
            "low_watermark=0.9, high_watermark=0.5",
        ),
        (lambda: NodeConfig(master="nohost"), "NodeConfig.master must look like 'host:port'"),
        (lambda: NodeConfig(memory_bytes=0), "NodeConfig.memory_bytes must be > 0, got 0"),
        (lambda: ClientConfig(timeout_s=-1), "ClientConfig.timeout_s must be a positive"),
        (lambda: PutOptions(replicas=0), "PutOptions.replicas must be 1..16, got 0"),
        (
            lambda: ClientConfig(reply_spin_s=-1),
            "ClientConfig.reply_spin_s must be in 0..1 seconds, got -1",
        ),
        (
            lambda: MasterConfig(busy_poll_s=2),
            "MasterConfig.busy_poll_s must be a number in [0, 1], got 2",
        ),
    ],
    ids=[
        "port",
        "lease",
        "watermarks",
        "address",
        "memory",
        "timeout",
        "replicas",
        "spin",
        "busy-poll",
    ],
)
def test_bad_values_are_named(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value)


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("64MiB") == 64 << 20
    assert parse_size(4096) == 4096
    with pytest.raises(ConfigError, match="--memory: cannot parse size 'lots'"):
        parse_size("lots", name="--memory")
