"""The cuda transport and CUDA segments over tcp: run on the GPU machine (`-m gpu`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kvstack.transfer import Engine, Op, OutOfBounds, PeerUnavailable, TransferRequest
from kvstack.transfer._peer import PeerProcess, random_bytes

pytestmark = pytest.mark.gpu

MiB = 1 << 20
SIZES = [1, 4097, 3 * MiB + 5]


@pytest.mark.parametrize("length", SIZES)
def test_cross_process_gpu_to_gpu(
    engine: Engine, start_peer: Callable[..., PeerProcess], length: int
) -> None:
    torch = importlib.import_module("torch")

    start_peer(f"gpu-remote:{4 * MiB}:cuda:31")
    local = torch.zeros(4 * MiB, dtype=torch.uint8, device="cuda")
    engine.register("gpu-local", local)
    engine.read(
        "gpu-local", "gpu-remote", length, local_offset=3, remote_offset=11, transport="cuda"
    )
    expected = random_bytes(31, 4 * MiB)[11 : 11 + length]
    np.testing.assert_array_equal(local[3 : 3 + length].cpu().numpy(), expected)
    local.random_(0, 256)
    engine.write(
        "gpu-local", "gpu-remote", length, local_offset=1, remote_offset=7, transport="cuda"
    )
    back = torch.zeros(length, dtype=torch.uint8, device="cuda")
    engine.read_into_tensor(back, "gpu-remote", remote_offset=7, transport="cuda")
    assert torch.equal(back, local[1 : 1 + length])


def _count(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_one_request_over_cuda_whole_segment_metrics_and_errors(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    # read/write of one request skip the Batch (Engine._cuda_one): it must still count, check
    # bounds and notice a dead owner.
    torch = importlib.import_module("torch")

    peer = start_peer(f"gpu-whole:{MiB}:cuda:36")
    local = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
    engine.register("gpu-whole-local", local)
    with pytest.raises(OutOfBounds, match="gpu-whole"):
        engine.write("gpu-whole-local", "gpu-whole", 16, remote_offset=MiB - 8)
    with pytest.raises(OutOfBounds, match="gpu-whole-local"):
        engine.read("gpu-whole-local", "gpu-whole", 16, local_offset=MiB - 8)
    labels = {"transport": "cuda", "peer": engine.lookup("gpu-whole").peer, "op": "read"}
    before = _count("kvstack_transfer_requests_total", labels)
    engine.read("gpu-whole-local", "gpu-whole", MiB)  # the whole segment: no slicing
    np.testing.assert_array_equal(local.cpu().numpy(), random_bytes(36, MiB))
    assert _count("kvstack_transfer_requests_total", labels) == before + 1
    local.fill_(9)
    engine.write("gpu-whole-local", "gpu-whole", MiB)
    back = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
    engine.read_into_tensor(back, "gpu-whole")
    assert (back == 9).all()
    peer.kill()  # its segment's record is cached: the owner's pid is checked per request
    with pytest.raises(PeerUnavailable, match="has exited"):
        engine.write("gpu-whole-local", "gpu-whole", 64)


@pytest.mark.parametrize("transport", ["cuda", "tcp"])
def test_gpu_segment_with_host_buffer(
    engine: Engine, start_peer: Callable[..., PeerProcess], transport: str
) -> None:
    # tcp: the owner stages its GPU memory through host memory on the serving side.
    start_peer(f"gpu-remote2:{4 * MiB}:cuda:32")
    host = engine.allocate("host-local", 4 * MiB)
    engine.read("host-local", "gpu-remote2", 4 * MiB, transport=transport)
    np.testing.assert_array_equal(host, random_bytes(32, 4 * MiB))
    host[:] = 5
    engine.write("host-local", "gpu-remote2", MiB, remote_offset=MiB, transport=transport)
    check = np.zeros(MiB, dtype=np.uint8)
    engine.read_into_tensor(check, "gpu-remote2", remote_offset=MiB, transport=transport)
    assert (check == 5).all()


def test_page_batch_to_a_gpu_segment_over_tcp(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    # Vectored frames into and out of a peer's GPU memory: the peer stages each frame's pages
    # through one host buffer (TcpServer._vector_slow).
    start_peer(f"gpu-pages:{4 * MiB}:cuda:34")
    host = engine.allocate("host-pages", 4 * MiB)
    rng = np.random.default_rng(35)
    slot = 16 << 10
    local_offsets = rng.choice(256, 96, replace=False) * slot + rng.integers(0, 64, 96)
    remote_offsets = rng.choice(256, 96, replace=False) * slot + rng.integers(0, 64, 96)
    lengths = rng.integers(1, slot - 64, 96)
    remote = random_bytes(34, 4 * MiB)
    engine.transfer_pages(
        Op.READ, "host-pages", "gpu-pages", local_offsets=local_offsets,
        remote_offsets=remote_offsets, lengths=lengths, transport="tcp",
    )  # fmt: skip
    for lo, ro, n in zip(local_offsets, remote_offsets, lengths, strict=True):
        np.testing.assert_array_equal(host[lo : lo + n], remote[ro : ro + n])
    host[:] = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
    engine.transfer_pages(
        Op.WRITE, "host-pages", "gpu-pages", local_offsets=local_offsets,
        remote_offsets=remote_offsets, lengths=lengths, transport="tcp",
    )  # fmt: skip
    back = np.zeros(4 * MiB, dtype=np.uint8)
    engine.read_into_tensor(back, "gpu-pages", transport="tcp")
    for lo, ro, n in zip(local_offsets, remote_offsets, lengths, strict=True):
        remote[ro : ro + n] = host[lo : lo + n]
    np.testing.assert_array_equal(back, remote)


def test_local_gpu_tensor_to_host_peer_over_tcp_and_shm(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    torch = importlib.import_module("torch")

    start_peer(f"host-remote:{MiB}:shm:33")
    expected = random_bytes(33, MiB)
    # Each transport reads what the previous one wrote, then writes its own fill value.
    for fill, transport in ((3, "tcp"), (4, "shm")):
        tensor = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
        engine.read_into_tensor(tensor, "host-remote", transport=transport)
        np.testing.assert_array_equal(tensor.cpu().numpy(), expected)
        tensor.fill_(fill)
        engine.write_tensor(tensor, "host-remote", transport=transport)
        back = np.zeros(MiB, dtype=np.uint8)
        engine.read_into_tensor(back, "host-remote", transport=transport)
        assert (back == fill).all()
        expected = back


def test_cuda_is_chosen_automatically_for_gpu_segments(
    engine: Engine, start_peer: Callable[..., PeerProcess]
) -> None:
    torch = importlib.import_module("torch")

    start_peer(f"gpu-auto:{MiB}:cuda:34")
    engine.register("gpu-auto-local", torch.zeros(MiB, dtype=torch.uint8, device="cuda"))
    batch = engine.submit([TransferRequest(Op.READ, "gpu-auto-local", 0, "gpu-auto", 0, MiB)])
    batch.wait(timeout_s=60)
    batch.raise_for_errors()
    work = batch._works[0]
    assert work is not None
    assert work.transport == "cuda"


def test_cross_process_across_gpus(engine: Engine, start_peer: Callable[..., PeerProcess]) -> None:
    # Peer on the last GPU, us on the first: two GPUs on a multi-GPU machine (one GPU: the same).
    torch = importlib.import_module("torch")
    last = torch.cuda.device_count() - 1
    start_peer(f"gpu-far:{8 * MiB}:cuda{last}:35")
    local = torch.zeros(8 * MiB, dtype=torch.uint8, device="cuda:0")
    engine.register("gpu-near", local)
    engine.read("gpu-near", "gpu-far", 8 * MiB - 3, local_offset=3, transport="cuda")
    expected = random_bytes(35, 8 * MiB)[: 8 * MiB - 3]
    np.testing.assert_array_equal(local[3:].cpu().numpy(), expected)
    local.fill_(1)
    engine.write("gpu-near", "gpu-far", 8 * MiB, transport="cuda")
    back = np.zeros(8 * MiB, dtype=np.uint8)
    engine.read_into_tensor(back, "gpu-far", transport="cuda")
    assert (back == 1).all()
