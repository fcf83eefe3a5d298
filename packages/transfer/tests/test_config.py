import dataclasses
from typing import Any

import pytest

from kvstack.transfer import ConfigError, EngineConfig, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("4KiB", 4096), ("64MiB", 64 << 20), ("4GiB", 4 << 30), ("1.5KiB", 1536),
     ("512K", 512_000), ("2MB", 2_000_000), ("7B", 7), (12, 12)],
)  # fmt: skip
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4 XiB", "-3", -1])
def test_parse_size_refuses_junk_naming_it(text: str | int) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(64 << 20) == "64 MiB"
    assert format_size(4096) == "4 KiB"
    assert format_size(4097) == "4097 B"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata_url", "localhost:7710"),
        ("tcp_port", 70000),
        ("transports", ("tcp", "rdma")),
        ("transports", ()),
        ("tcp_connections", 0),
        ("tcp_stripe_bytes", 10),
        ("request_timeout_s", 0),
        ("connect_timeout_s", float("nan")),
        ("metadata_ttl_s", -1.0),
        ("metrics_port", -5),
    ],
)
def test_engine_config_names_the_bad_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(EngineConfig(metadata_url="memory://cfg"), **{field: value})


def test_environment_supplies_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_TRANSFER_METADATA_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("KVSTACK_TRANSFER_TRANSPORTS", "tcp, shm")
    monkeypatch.setenv("KVSTACK_TRANSFER_TOKEN", "s3cret")
    monkeypatch.setenv("KVSTACK_TRANSFER_METRICS_PORT", "9911")
    config = EngineConfig()
    assert config.metadata_url == "redis://127.0.0.1:1/0"
    assert config.transports == ("tcp", "shm")
    assert config.token == "s3cret"
    assert config.metrics_port == 9911
    assert config.host == "127.0.0.1"  # bind loopback unless told otherwise


def test_environment_junk_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_TRANSFER_METRICS_PORT", "ninety")
    with pytest.raises(ConfigError, match="KVSTACK_TRANSFER_METRICS_PORT='ninety'"):
        EngineConfig()
    monkeypatch.delenv("KVSTACK_TRANSFER_METRICS_PORT")
    monkeypatch.setenv("KVSTACK_TRANSFER_TRANSPORTS", "rdma")
    with pytest.raises(ConfigError, match="'rdma'"):
        EngineConfig()
